//! The little HTTP/1.1 client of `shoal`'s daemon verbs: one request per connection, the
//! API key (if any) as `Authorization: Bearer`, replies whole or chunked. The daemon's side
//! is `shoal_server` (hyper).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// The longest header line read from the daemon.
const MAX_LINE: u64 = 64 << 10;

fn read_line(r: &mut impl BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    r.take(MAX_LINE).read_line(&mut line)?;
    Ok(line)
}

/// A client's answer: the status, and the body read through `on_data` as it arrives.
pub fn call(
    addr: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    on_data: &mut dyn FnMut(&[u8]),
) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(addr)
        .with_context(|| format!("cannot reach the shoal daemon at {addr}; start it with `shoal serve`"))?;
    s.set_read_timeout(Some(Duration::from_secs(3600)))?;
    let auth = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let line = read_line(&mut r)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", line.chars().take(80).collect::<String>()))?;
    let (mut len, mut chunked) = (None, false);
    loop {
        let h = read_line(&mut r)?;
        if h.is_empty() || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                len = v.trim().parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        loop {
            let size = read_line(&mut r)?;
            let n = usize::from_str_radix(size.trim(), 16).with_context(|| format!("bad chunk size {size:?}"))?;
            if n == 0 {
                break;
            }
            if n > 1 << 30 {
                bail!("a chunk of {n} bytes from the daemon");
            }
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf)?;
            on_data(&buf[..n]);
        }
    } else {
        let mut buf = Vec::new();
        match len {
            Some(n) => {
                (&mut r).take(n as u64).read_to_end(&mut buf)?;
            }
            None => {
                r.read_to_end(&mut buf)?;
            }
        }
        on_data(&buf);
    }
    Ok(status)
}
