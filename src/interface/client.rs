//! `pcx client`: JSON lines on stdin → the server → JSON lines on stdout, the same format as
//! `pcx batch`, so every script written for `batch` runs against a server.
//!
//! Requests are pipelined: a sender thread writes frames while the main thread reads answers
//! in order. Lines that are not JSON, or too long, are answered here exactly as `batch` would
//! answer them, in their place in the stream.

use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc;

use serde_json::Value;

use crate::interface::batch::{read_bounded_line, Line};
use crate::interface::protocol::{refused, RequestError};
use crate::interface::wire::{
    body_len, decode_answer, encode_frame, to_json, to_msgpack, HEADER_LEN,
};

/// One answer's place in the output: from the server, or made here.
enum Slot {
    Remote,
    Local(Value),
}

/// Reads one answer frame.
fn read_answer(r: &mut impl Read) -> io::Result<Value> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let mut body = vec![0u8; body_len(header) as usize];
    r.read_exact(&mut body)?;
    decode_answer(&body)
        .and_then(to_json)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Sends one frame and reads its answer (for set-up exchanges like TCP auth).
pub fn exchange(stream: &mut (impl Read + Write), request: &Value) -> io::Result<Value> {
    stream.write_all(&encode_frame(&to_msgpack(request)))?;
    read_answer(stream)
}

/// Runs the client over a connected stream. Returns how many answers were written.
pub fn run<S>(
    stream: S,
    input: impl BufRead + Send + 'static,
    output: &mut impl Write,
    max_request_bytes: u64,
    max_in_flight: usize,
) -> io::Result<u64>
where
    S: Read + Write + Send + 'static,
    S: TryCloneStream,
{
    let mut reader = stream.try_clone_stream()?;
    let mut writer = stream;
    let (slots_tx, slots_rx) = mpsc::sync_channel::<Slot>(max_in_flight.max(1));
    let sender = std::thread::Builder::new()
        .name("pcx-client-sender".into())
        .spawn(move || -> io::Result<()> {
            let mut input = input;
            while let Some(line) = read_bounded_line(&mut input, max_request_bytes)? {
                let slot = match line {
                    Line::TooLong(len) => Slot::Local(refused(&RequestError::TooLarge {
                        len,
                        limit: max_request_bytes,
                    })),
                    Line::Text(text) if text.iter().all(u8::is_ascii_whitespace) => continue,
                    Line::Text(text) => match serde_json::from_slice::<Value>(&text) {
                        Err(e) => Slot::Local(refused(&RequestError::BadJson(e.to_string()))),
                        Ok(v) => {
                            writer.write_all(&encode_frame(&to_msgpack(&v)))?;
                            Slot::Remote
                        }
                    },
                };
                if slots_tx.send(slot).is_err() {
                    break;
                }
            }
            writer.flush()?;
            writer.shutdown_write()
        })?;
    let mut answered = 0;
    for slot in slots_rx {
        let value = match slot {
            Slot::Local(v) => v,
            Slot::Remote => read_answer(&mut reader)?,
        };
        serde_json::to_writer(&mut *output, &value)?;
        output.write_all(b"\n")?;
        output.flush()?;
        answered += 1;
    }
    match sender.join() {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::other("the client's sender thread panicked")),
    }
    Ok(answered)
}

/// A stream that can be split into a reading and a writing handle.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> io::Result<Self>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}
