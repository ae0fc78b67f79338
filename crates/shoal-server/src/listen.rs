//! The accept loop and the daemon's life: connections capped and bounded in time, the
//! periodic checkpoints, and the shutdown on SIGTERM or SIGINT (requests in flight get
//! [`Config::shutdown_wait`], then every persistent actor is checkpointed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::{App, Config, ServerError};

/// The answer to a connection past the cap.
fn busy_answer() -> Vec<u8> {
    let body = "{\"error\": {\"message\": \"the daemon has its most connections open (--max-connections); \
                retry\", \"code\": 503}}\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n\
         Retry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn busy(mut sock: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = sock.write_all(&busy_answer()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

/// Serves one connection (one request), within the connection's lifetime.
async fn connection(sock: TcpStream, routes: Router, config: Arc<Config>, mut stop: watch::Receiver<bool>) {
    let _ = sock.set_nodelay(true);
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(config.request_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(false)
        .serve_connection(TokioIo::new(sock), TowerToHyperService::new(routes));
    let mut conn = std::pin::pin!(conn);
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        _ = tokio::time::sleep(config.connection_lifetime) => {
            log::info!("a connection ran past its lifetime ({:?}) and was closed", config.connection_lifetime);
            false
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => true,
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(config.shutdown_wait, conn.as_mut()).await;
    }
}

/// Checkpoints the actors that changed, every `every`.
async fn checkpoints(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let reg = app.registry.clone();
        let Ok(done) = tokio::task::spawn_blocking(move || reg.checkpoint(true, Duration::ZERO)).await else {
            continue;
        };
        for c in done {
            if let Err(e) = c.result {
                log::warn!("checkpoint of actor {}: {e}", c.id);
            }
        }
    }
}

pub(crate) async fn run(
    config: Config,
    loading: Router,
    load: crate::Loader,
    make: impl FnOnce(crate::Parts) -> (Arc<App>, Router),
    bound: impl FnOnce(SocketAddr),
    ready: impl FnOnce(SocketAddr, &App),
) -> Result<(), ServerError> {
    let listener =
        TcpListener::bind(config.addr).await.map_err(|source| ServerError::Bind { addr: config.addr, source })?;
    // Handlers are in place before anyone is told the daemon is up.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let at = listener.local_addr()?;
    bound(at);
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut routes = loading;
    let mut app: Option<Arc<App>> = None;
    let mut periodic = None;
    let mut loader = Some(tokio::task::spawn_blocking(load));
    let mut make = Some(make);
    let mut ready = Some(ready);
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            loaded = async { loader.as_mut().expect("guarded").await }, if loader.is_some() => {
                loader = None;
                let parts = match loaded {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => return Err(ServerError::Load(e)),
                    Err(e) => return Err(ServerError::Load(format!("loading failed: {e}"))),
                };
                let (a, r) = (make.take().expect("once"))(parts);
                routes = r;
                periodic = config.checkpoint_every.map(|every| tokio::spawn(checkpoints(a.clone(), every)));
                (ready.take().expect("once"))(at, &a);
                app = Some(a);
            }
            r = listener.accept() => match r {
                Ok((sock, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (routes, config, stop) = (routes.clone(), config.clone(), stop.clone());
                        conns.spawn(async move {
                            connection(sock, routes, config, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(busy(sock));
                    }
                },
                // Out of descriptors, say: wait a little rather than spin.
                Err(e) => {
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
        while conns.try_join_next().is_some() {}
    };
    drop(listener);
    let t0 = Instant::now();
    eprintln!("shoal serve: {why}: finishing {} requests in flight (at most {:?})", conns.len(), config.shutdown_wait);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(config.shutdown_wait + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    if let Some(p) = periodic {
        p.abort();
    }
    let Some(app) = app else {
        eprintln!("shoal serve: {why} while loading: stopped before serving anything");
        return Ok(());
    };
    let reg = app.registry.clone();
    let pooled = app.pool.ids();
    let wait = config.shutdown_wait;
    let done = tokio::task::spawn_blocking(move || {
        for id in pooled {
            let _ = reg.kill(id);
        }
        reg.checkpoint(false, wait)
    })
    .await
    .unwrap_or_default();
    let ok = done.iter().filter(|c| c.result.is_ok()).count();
    for c in &done {
        if let Err(e) = &c.result {
            eprintln!("shoal serve: actor {}: not checkpointed: {e}", c.id);
        }
    }
    eprintln!(
        "shoal serve: {ok} of {} actors checkpointed in {:.1?}; a daemon started on this store brings them back",
        done.len(),
        t0.elapsed()
    );
    Ok(())
}
