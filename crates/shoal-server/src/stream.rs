//! Streamed replies with backpressure. An actor's events come through its bounded reply
//! queue ([`shoal_actor::REPLY_QUEUE`]); a blocking task moves them into a small async
//! channel that the response body reads as the socket takes bytes. A reader that does not
//! read fills both and the actor waits on its next reply: the daemon's memory does not grow.
//! A reader that goes away drops the channel; the task then drops the actor's queue, whose
//! next reply fails in the guest ("the reply's reader has gone"), and runs the `abandoned`
//! hook (the OpenAI endpoint kills its pool actor there).
//!
//! Messages' replies are NDJSON, each line one of `{"chunk": TEXT}` (UTF-8 text; a character
//! cut between two replies is held back until it is whole), `{"data": BASE64}` (bytes that
//! are not UTF-8, exactly as the guest replied them), then `{"done": true}` or
//! `{"error": MESSAGE}`.

use std::sync::mpsc;

use axum::body::{Body, Bytes};
use base64::Engine as _;
use serde_json::{Value, json};
use shoal_actor::Event;
use tokio::sync::mpsc as amp;

/// Lines buffered between the actor's queue and the socket.
pub(crate) const LINES: usize = 8;

/// Splits a reply's bytes into text and binary parts, holding back a UTF-8 character cut
/// at the end of a part until the next.
#[derive(Default)]
pub struct Utf8Carry {
    held: Vec<u8>,
}

/// A part of a reply.
#[derive(Debug, PartialEq)]
pub enum Part {
    /// UTF-8 text.
    Text(String),
    /// Bytes that are not UTF-8.
    Bytes(Vec<u8>),
}

impl Utf8Carry {
    /// The parts `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Part> {
        self.held.extend_from_slice(chunk);
        let bytes = std::mem::take(&mut self.held);
        match std::str::from_utf8(&bytes) {
            Ok("") => Vec::new(),
            Ok(s) => vec![Part::Text(s.to_string())],
            // Cut inside a character at the end: keep the tail for the next part.
            Err(e) if e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4 => {
                let (text, tail) = bytes.split_at(e.valid_up_to());
                self.held = tail.to_vec();
                let s = String::from_utf8_lossy(text).into_owned();
                if s.is_empty() { Vec::new() } else { vec![Part::Text(s)] }
            }
            Err(_) => vec![Part::Bytes(bytes)],
        }
    }

    /// What is left at the end of the reply.
    pub fn finish(&mut self) -> Option<Part> {
        let b = std::mem::take(&mut self.held);
        (!b.is_empty()).then_some(Part::Bytes(b))
    }
}

/// One NDJSON line of a part.
pub fn part_line(p: &Part) -> Value {
    match p {
        Part::Text(s) => json!({ "chunk": s }),
        Part::Bytes(b) => json!({ "data": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("JSON");
    b.push(b'\n');
    Bytes::from(b)
}

/// Moves the events into a channel of at most [`LINES`] encoded pieces, made by `encode`
/// (it returns the pieces of one event; after [`Event::Done`] the stream ends). Runs on a
/// blocking thread; when the body's reader has gone, drops the events (and so the actor's
/// queue) and calls `abandoned`.
pub fn pump(
    events: impl Iterator<Item = Event> + Send + 'static,
    encode: impl FnMut(Event) -> Vec<Bytes> + Send + 'static,
    abandoned: impl FnOnce() + Send + 'static,
) -> Body {
    pump_until(events, |ev| matches!(ev, Event::Done(_)), encode, abandoned)
}

/// [`pump`] for any kind of event: the stream ends after an event `last` says is the last,
/// or when the events end.
pub fn pump_until<E: Send + 'static>(
    events: impl Iterator<Item = E> + Send + 'static,
    last: impl Fn(&E) -> bool + Send + 'static,
    mut encode: impl FnMut(E) -> Vec<Bytes> + Send + 'static,
    abandoned: impl FnOnce() + Send + 'static,
) -> Body {
    let (tx, out) = amp::channel::<Bytes>(LINES);
    tokio::task::spawn_blocking(move || {
        let mut events = events;
        for ev in events.by_ref() {
            let end = last(&ev);
            for piece in encode(ev) {
                if tx.blocking_send(piece).is_err() {
                    drop(events);
                    drop(encode);
                    abandoned();
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), out))
    });
    Body::from_stream(stream)
}

/// The NDJSON body of a message's reply (see the module docs).
pub fn ndjson(rx: mpsc::Receiver<Event>, abandoned: impl FnOnce() + Send + 'static) -> Body {
    let mut carry = Utf8Carry::default();
    pump(
        rx.into_iter(),
        move |ev| match ev {
            Event::Chunk(c) => carry.push(&c).iter().map(|p| line(&part_line(p))).collect(),
            Event::Done(r) => {
                let mut v: Vec<Bytes> = carry.finish().iter().map(|p| line(&part_line(p))).collect();
                v.push(line(&match r {
                    Ok(()) => json!({"done": true}),
                    Err(e) => json!({"error": e}),
                }));
                v
            }
        },
        abandoned,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_cut_between_replies_are_joined_and_bytes_stay_bytes() {
        let mut c = Utf8Carry::default();
        let e = "é".as_bytes();
        assert_eq!(c.push(&[b'a', e[0]]), vec![Part::Text("a".into())]);
        assert_eq!(c.push(&[e[1], b'b']), vec![Part::Text("éb".into())]);
        assert_eq!(c.push(&[0xff, 0x00, 0x80]), vec![Part::Bytes(vec![0xff, 0x00, 0x80])]);
        assert_eq!(c.push(&[0xe2, 0x82]), vec![]);
        assert_eq!(c.finish(), Some(Part::Bytes(vec![0xe2, 0x82])));
        assert_eq!(c.finish(), None);
        assert_eq!(part_line(&Part::Bytes(vec![0, 255])), json!({"data": "AP8="}));
    }
}
