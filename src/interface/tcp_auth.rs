//! Authentication on loopback TCP without sending the token: each side proves it knows the
//! token by a MAC over two fresh nonces, the server first.
//!
//! Why not send the token itself: a client finds a fleet's holder at an address the database
//! names, and an address outlives its server. Once the holder dies, another local user's
//! process may listen on that port; a client that sent the token first handed it to that
//! process, and one that then took `{"ok":true}` for an answer sent it writes that were
//! answered and went nowhere. With the challenge the client learns that the server knows the
//! token before it sends anything else, and a process that does not know it learns nothing
//! it could use against the real server (its nonce is never the server's).
//!
//! The exchange, every value base64 (standard, padded) in JSON:
//! 1. client → `{"op":"auth_challenge","client_nonce_b64":N_c}` (32 random bytes);
//! 2. server → `{"ok":true,"server_nonce_b64":N_s,"server_proof_b64":P_s}`;
//! 3. the client checks `P_s`, then → `{"op":"auth_proof","client_proof_b64":P_c}`;
//! 4. server → `{"ok":true}`, or `unauthorized` and the connection closed.
//!
//! `P = HMAC-SHA256(key = token, "pcx-tcp-auth-v1/" + role + "\0" + N_c + N_s)`, `role` being
//! `server` or `client`, so that neither proof can be replayed as the other.
//!
//! Pure: no IO; the server and the clients (Rust and Python) do the exchange.

use base64::Engine as _;
use hmac::{KeyInit, Mac};

/// Bytes of each nonce.
pub const NONCE_BYTES: usize = 32;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Who proves: the labels keep a server's proof from passing as a client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Server => b"pcx-tcp-auth-v1/server\0",
            Role::Client => b"pcx-tcp-auth-v1/client\0",
        }
    }
}

/// The proof that `role` knows `token`, for this pair of nonces.
pub fn proof(token: &str, role: Role, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    mac(token, role, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Whether `given` is `role`'s proof, checked in constant time.
pub fn verify(
    token: &str,
    role: Role,
    client_nonce: &[u8],
    server_nonce: &[u8],
    given: &[u8],
) -> bool {
    mac(token, role, client_nonce, server_nonce)
        .verify_slice(given)
        .is_ok()
}

fn mac(token: &str, role: Role, client_nonce: &[u8], server_nonce: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length (a long one is hashed first), so this never fails; were
    // it to, an all-zero key fails closed: no proof made with the token would match.
    let mut mac = HmacSha256::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
    mac.update(role.label());
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac
}

/// A fresh nonce from the operating system's generator.
pub fn nonce() -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

/// Base64 of `bytes`, as the exchange carries them.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `field` of `v` decoded from base64 as exactly `len` bytes, or `None`.
pub fn field_bytes(v: &serde_json::Value, field: &str, len: usize) -> Option<Vec<u8>> {
    let s = v.get(field)?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    (bytes.len() == len).then_some(bytes)
}

/// Bytes of a proof.
pub const PROOF_BYTES: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_passes_only_for_its_token_role_and_nonces() {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        let p = proof("token-token-token", Role::Server, &c, &s);
        assert!(verify("token-token-token", Role::Server, &c, &s, &p));
        assert!(!verify("token-token-tokeN", Role::Server, &c, &s, &p));
        assert!(!verify("token-token-token", Role::Client, &c, &s, &p));
        assert!(!verify("token-token-token", Role::Server, &s, &c, &p));
        assert!(!verify("token-token-token", Role::Server, &c, &s, &p[..31]));
    }

    #[test]
    fn the_proof_is_hmac_sha256_of_the_label_and_nonces() {
        // Computed apart, with Python's `hmac` (what the Python client uses):
        // hmac.new(b"Jefe", b"pcx-tcp-auth-v1/client\0" + bytes([7])*32 + bytes([9])*32,
        //          hashlib.sha256).hexdigest()
        let expected = "5d0b58f128215847f5b610294700ade94de68d303feb4152a12c1ba8fc311e61";
        let got: String = proof("Jefe", Role::Client, &[7u8; 32], &[9u8; 32])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
