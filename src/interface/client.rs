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
    let frame = encode_frame(&to_msgpack(request))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    stream.write_all(&frame)?;
    read_answer(stream)
}

/// Why authentication on TCP failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authenticating: {0}")]
    Io(#[from] io::Error),
    #[error("the server refused the token: {0}")]
    Refused(Value),
    /// The peer could not prove it knows the token: not the server meant (an address that
    /// outlived it, now another process's). Nothing but a nonce was sent to it.
    #[error(
        "unauthorized: the server's proof does not match the token given, so either the token \
         is not this server's or the address is not the pcx server meant (now another \
         process's?); nothing but a nonce was sent to it"
    )]
    Unproven,
}

/// TCP: the server proves it knows `token`, then this client does
/// ([`crate::interface::tcp_auth`]); the token itself never crosses the connection.
pub fn authenticate(stream: &mut (impl Read + Write), token: &str) -> Result<(), AuthError> {
    use crate::interface::tcp_auth::{self, Role, NONCE_BYTES, PROOF_BYTES};
    // One step: an answer that is not ok is the server's refusal.
    let mut step = |request: Value| match exchange(stream, &request)? {
        answer if answer["ok"] == true => Ok(answer),
        answer => Err(AuthError::Refused(answer)),
    };
    let client_nonce = tcp_auth::nonce()?;
    let challenge = step(serde_json::json!({
        "op": "auth_challenge",
        "client_nonce_b64": tcp_auth::b64(&client_nonce),
    }))?;
    let server_nonce = tcp_auth::field_bytes(&challenge, "server_nonce_b64", NONCE_BYTES)
        .ok_or(AuthError::Unproven)?;
    let proven = tcp_auth::field_bytes(&challenge, "server_proof_b64", PROOF_BYTES)
        .is_some_and(|p| tcp_auth::verify(token, Role::Server, &client_nonce, &server_nonce, &p));
    if !proven {
        return Err(AuthError::Unproven);
    }
    let proof = tcp_auth::proof(token, Role::Client, &client_nonce, &server_nonce);
    step(serde_json::json!({"op": "auth_proof", "client_proof_b64": tcp_auth::b64(&proof)}))?;
    Ok(())
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
        // Its error says which side failed: `true`, the server's connection.
        .spawn(move || -> Result<(), (bool, io::Error)> {
            let mut input = input;
            let to_server = |e| (true, e);
            while let Some(line) =
                read_bounded_line(&mut input, max_request_bytes).map_err(|e| (false, e))?
            {
                let slot = match line {
                    Line::TooLong(len) => Slot::Local(refused(&RequestError::TooLarge {
                        len,
                        limit: max_request_bytes,
                    })),
                    Line::Text(text) if text.iter().all(u8::is_ascii_whitespace) => continue,
                    Line::Text(text) => match serde_json::from_slice::<Value>(&text) {
                        Err(e) => Slot::Local(refused(&RequestError::BadJson(e.to_string()))),
                        Ok(v) => match encode_frame(&to_msgpack(&v)) {
                            Ok(frame) => {
                                writer.write_all(&frame).map_err(to_server)?;
                                Slot::Remote
                            }
                            // Longer than a frame can say: refused here, never sent cut.
                            Err(e) => Slot::Local(crate::interface::answer::failed(
                                e.kind(),
                                &format!("the request is not sent: {e}"),
                            )),
                        },
                    },
                };
                if slots_tx.send(slot).is_err() {
                    break;
                }
            }
            writer.flush().map_err(to_server)?;
            writer.shutdown_write().map_err(to_server)
        })?;
    let mut answered = 0;
    for slot in slots_rx {
        let value = match slot {
            Slot::Local(v) => v,
            Slot::Remote => read_answer(&mut reader).map_err(|e| gone(e, answered))?,
        };
        serde_json::to_writer(&mut *output, &value)?;
        output.write_all(b"\n")?;
        output.flush()?;
        answered += 1;
    }
    match sender.join() {
        Ok(Err((true, e))) => return Err(gone(e, answered)),
        Ok(Err((false, e))) => return Err(e),
        Ok(Ok(())) => {}
        Err(_) => return Err(io::Error::other("the client's sender thread panicked")),
    }
    Ok(answered)
}

/// The server gone mid-stream (killed, or its connection cut), while reading an answer or
/// sending a request: says how far the answers came, since the requests after them may or may
/// not have been applied.
fn gone(e: io::Error, answered: u64) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "the connection to the server failed after {answered} answers (at request {}: {e}). \
             The requests after those may or may not have been applied: send them again with \
             their request_id to be told which",
            answered + 1
        ),
    )
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
