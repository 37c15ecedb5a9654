//! `pcx batch`: JSON lines in, JSON lines out, in order, streamed.
//!
//! A reader thread reads bounded lines from the input; each parsed request is handed to the
//! context actor at once (so requests that arrive while a group is syncing commit together),
//! and its answer's future joins an ordered queue of at most `max_in_flight`. The writer
//! awaits the queue in order and writes and flushes each answer as soon as it is ready, i.e.
//! once its change is durable, without waiting for the end of the input.

use std::io::{self, BufRead, Write};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::context::Context;
use crate::interface::protocol::{parse, refused, submit, with_id, AnswerFuture, RequestError};

/// One input line, or the length of a line that was too long to keep.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(Vec<u8>),
    TooLong(u64),
}

/// Reads one line (without its `\n` or `\r\n`), keeping at most `limit` bytes of it: a longer
/// line is read to its end and dropped, so the next line is served. `None` at end of input.
pub fn read_bounded_line(reader: &mut impl BufRead, limit: u64) -> io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut len: u64 = 0;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        len += chunk.len() as u64;
        if len <= limit.saturating_add(1) {
            buf.extend_from_slice(chunk);
        } else {
            buf = Vec::new();
        }
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
        len -= 1;
    }
    if len > limit {
        return Ok(Some(Line::TooLong(len)));
    }
    Ok(Some(Line::Text(buf)))
}

/// What a batch run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub answered: u64,
    pub failed: u64,
}

/// Serves every line of `input`, writing answers to `output`. Returns when the input ends and
/// every answer is written.
pub async fn run<R, W>(
    ctx: &Context,
    input: R,
    output: &mut W,
    max_request_bytes: u64,
    max_in_flight: usize,
) -> io::Result<Summary>
where
    R: BufRead + Send + 'static,
    W: Write,
{
    let (line_tx, mut line_rx) = mpsc::channel::<io::Result<Line>>(256);
    let reader = std::thread::Builder::new()
        .name("pcx-batch-reader".into())
        .spawn(move || {
            let mut input = input;
            loop {
                let line = read_bounded_line(&mut input, max_request_bytes);
                let end = matches!(line, Ok(None) | Err(_));
                let sent = match line {
                    Ok(None) => break,
                    other => {
                        line_tx.blocking_send(other.map(|l| l.unwrap_or(Line::Text(Vec::new()))))
                    }
                };
                if end || sent.is_err() {
                    break;
                }
            }
        })?;

    let (answer_tx, mut answer_rx) = mpsc::channel::<AnswerFuture>(max_in_flight.max(1));
    let produce = async move {
        let mut read_error = None;
        while let Some(line) = line_rx.recv().await {
            let answer: AnswerFuture = match line {
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
                Ok(Line::TooLong(len)) => ready(refused(&RequestError::TooLarge {
                    len,
                    limit: max_request_bytes,
                })),
                Ok(Line::Text(text)) => {
                    if text.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let (id, request) = parse(&text);
                    match request {
                        Ok(r) => {
                            let fut = submit(ctx, r);
                            Box::pin(async move { with_id(id, fut.await) })
                        }
                        Err(e) => ready(with_id(id, refused(&e))),
                    }
                }
            };
            if answer_tx.send(answer).await.is_err() {
                break;
            }
        }
        read_error
    };
    let consume = async {
        let mut summary = Summary::default();
        while let Some(answer) = answer_rx.recv().await {
            let value = answer.await;
            if value.get("ok") != Some(&Value::Bool(true)) {
                summary.failed += 1;
            }
            summary.answered += 1;
            serde_json::to_writer(&mut *output, &value)?;
            output.write_all(b"\n")?;
            output.flush()?;
        }
        Ok::<_, io::Error>(summary)
    };
    let (read_error, summary) = tokio::join!(produce, consume);
    if reader.join().is_err() {
        return Err(io::Error::other("the input reader thread panicked"));
    }
    if let Some(e) = read_error {
        return Err(e);
    }
    summary
}

fn ready(value: Value) -> AnswerFuture {
    Box::pin(std::future::ready(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], limit: u64) -> Vec<Line> {
        let mut r = io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        while let Some(l) = read_bounded_line(&mut r, limit).unwrap() {
            out.push(l);
        }
        out
    }

    #[test]
    fn a_long_line_is_dropped_and_the_next_one_read() {
        let got = lines(b"abc\r\n0123456789\nxy\nlast", 5);
        assert_eq!(
            got,
            vec![
                Line::Text(b"abc".to_vec()),
                Line::TooLong(10),
                Line::Text(b"xy".to_vec()),
                Line::Text(b"last".to_vec()),
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_kept() {
        assert_eq!(lines(b"12345\n", 5), vec![Line::Text(b"12345".to_vec())]);
        assert_eq!(lines(b"123456\n", 5), vec![Line::TooLong(6)]);
    }
}
