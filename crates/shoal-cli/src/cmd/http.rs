//! The little HTTP/1.1 that `shoal serve` and its clients speak: one request per
//! connection (`Connection: close`), bodies sized by `Content-Length`, replies either whole
//! or streamed with chunked transfer encoding.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The most bytes of a request body.
pub const MAX_BODY: usize = 64 << 20;

/// A request as the server read it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request; `Err` carries the status and reason to answer with.
pub fn read_request(stream: &mut BufReader<TcpStream>) -> Result<Request, (u16, String)> {
    let mut line = String::new();
    stream.read_line(&mut line).map_err(|e| (400, format!("reading the request: {e}")))?;
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_string(), p.to_string()),
        _ => return Err((400, format!("not an HTTP request line: {:?}", line.trim_end()))),
    };
    let mut len = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        let n = stream.read_line(&mut h).map_err(|e| (400, format!("reading headers: {e}")))?;
        if n == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse().map_err(|_| (400, format!("bad Content-Length `{v}`")))?;
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        return Err((411, "chunked request bodies are not accepted; send Content-Length".into()));
    }
    if len > MAX_BODY {
        return Err((413, format!("a body of {len} bytes (at most {MAX_BODY})")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(|e| (400, format!("reading the body: {e}")))?;
    Ok(Request { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a whole response.
pub fn respond(w: &mut (impl Write + ?Sized), status: u16, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

/// Writes a JSON response.
pub fn json(w: &mut (impl Write + ?Sized), status: u16, v: &serde_json::Value) -> std::io::Result<()> {
    let mut body = serde_json::to_vec(v).expect("JSON serializes");
    body.push(b'\n');
    respond(w, status, "application/json", &body)
}

/// A JSON error: `{"error": {"message": ..., "code": status}}` (the OpenAI shape).
pub fn error(w: &mut (impl Write + ?Sized), status: u16, message: &str) -> std::io::Result<()> {
    json(w, status, &serde_json::json!({"error": {"message": message, "code": status}}))
}

/// A streamed response: chunks as they come.
pub struct Chunked<'a, W: Write>(pub &'a mut W);

impl<'a, W: Write> Chunked<'a, W> {
    pub fn start(w: &'a mut W, content_type: &str) -> std::io::Result<Chunked<'a, W>> {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        )?;
        w.flush()?;
        Ok(Chunked(w))
    }

    pub fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.0, "{:x}\r\n", data.len())?;
        self.0.write_all(data)?;
        self.0.write_all(b"\r\n")?;
        self.0.flush()
    }

    pub fn end(self) -> std::io::Result<()> {
        self.0.write_all(b"0\r\n\r\n")?;
        self.0.flush()
    }
}

/// A client's answer: the status, and the body read through `on_data` as it arrives.
pub fn call(addr: &str, method: &str, path: &str, body: &[u8], on_data: &mut dyn FnMut(&[u8])) -> anyhow::Result<u16> {
    use anyhow::Context;
    let mut s = TcpStream::connect(addr)
        .with_context(|| format!("cannot reach the shoal daemon at {addr}; start it with `shoal serve`"))?;
    s.set_read_timeout(Some(Duration::from_secs(3600)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {line:?}"))?;
    let (mut len, mut chunked) = (None, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
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
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).with_context(|| format!("bad chunk size {size:?}"))?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf)?;
            on_data(&buf[..n]);
        }
    } else {
        let mut buf = Vec::new();
        match len {
            Some(n) => {
                buf.resize(n, 0);
                r.read_exact(&mut buf)?;
            }
            None => {
                r.read_to_end(&mut buf)?;
            }
        }
        on_data(&buf);
    }
    Ok(status)
}
