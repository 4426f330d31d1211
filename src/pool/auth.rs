//! Password logins keyhole answers itself (`user=` with `password-file=`):
//! SCRAM-SHA-256 (RFC 5802 / RFC 7677, what PostgreSQL uses by default
//! since 14), MD5 (`md5` in pg_hba.conf) and cleartext. HMAC, SHA-256 and
//! PBKDF2 are ring's; MD5 is here, as ring has none (it is only the
//! password hash PostgreSQL's `md5` method prescribes, not a security
//! primitive keyhole relies on).
//!
//! Nothing here logs, and no error carries the password or a proof.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};

/// The mechanism keyhole offers back (never `-PLUS`: channel binding would
/// tie the exchange to a TLS session, which works for keyhole's own
/// upstream session, but PostgreSQL offers it only with TLS it terminates,
/// and `n,,` keeps the exchange the same through relays and tunnels).
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Most PBKDF2 iterations keyhole will run for a server (PostgreSQL's
/// default is 4096): a bound on the CPU one login may take.
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the server's SCRAM message is malformed ({0})")]
    Malformed(&'static str),
    #[error("the server's SCRAM nonce does not extend keyhole's")]
    Nonce,
    #[error("the server asks for {0} PBKDF2 iterations (keyhole allows 1 to 1000000)")]
    Iterations(u64),
    #[error("the server's SCRAM signature is wrong: it does not know the password (or is not the server)")]
    ServerSignature,
    #[error("no random numbers from the operating system")]
    Random,
}

/// One SCRAM-SHA-256 exchange, client side.
pub struct Scram {
    client_first_bare: String,
    nonce: String,
    /// Set by [`Scram::client_final`]: what the server must prove.
    server_signature: Option<[u8; 32]>,
}

impl Scram {
    /// Starts an exchange: returns it and the client-first message.
    /// PostgreSQL takes the user from the startup packet, so the SCRAM user
    /// name is empty, as libpq sends it.
    pub fn start(random: &dyn SecureRandom) -> Result<(Scram, String), AuthError> {
        let mut raw = [0u8; 18];
        random.fill(&mut raw).map_err(|_| AuthError::Random)?;
        Ok(Scram::with_nonce("", &B64.encode(raw)))
    }

    fn with_nonce(user: &str, nonce: &str) -> (Scram, String) {
        let client_first_bare = format!("n={user},r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            Scram {
                client_first_bare,
                nonce: nonce.to_owned(),
                server_signature: None,
            },
            first,
        )
    }

    /// The client-final message for the server-first message, with the
    /// proof that keyhole knows `password`.
    pub fn client_final(
        &mut self,
        server_first: &[u8],
        password: &[u8],
    ) -> Result<String, AuthError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(AuthError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(AuthError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(AuthError::Malformed("no salt"))?)
            .map_err(|_| AuthError::Malformed("salt is not base64"))?;
        let iterations: u64 = iterations
            .ok_or(AuthError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| AuthError::Malformed("iteration count is not a number"))?;
        let rounds = u32::try_from(iterations)
            .ok()
            .filter(|&i| i <= MAX_ITERATIONS)
            .and_then(std::num::NonZeroU32::new)
            .ok_or(AuthError::Iterations(iterations))?;

        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            password,
            &mut salted,
        );
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac::sign(&salted_key, b"Server Key");
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        );
        let mut expected = [0u8; 32];
        expected.copy_from_slice(server_signature.as_ref());
        self.server_signature = Some(expected);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server proves it knows the
    /// password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), AuthError> {
        let expected = self
            .server_signature
            .ok_or(AuthError::Malformed("server-final before server-first"))?;
        let text =
            std::str::from_utf8(server_final).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let given = text
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or(AuthError::Malformed("no verifier"))?;
        let given = B64
            .decode(given)
            .map_err(|_| AuthError::Malformed("verifier is not base64"))?;
        let differs = given.len() != expected.len()
            || given
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        if differs {
            return Err(AuthError::ServerSignature);
        }
        Ok(())
    }
}

/// PostgreSQL's `md5` answer: `"md5" + hex(md5(hex(md5(password + user)) + salt))`.
pub fn md5_password(user: &str, password: &[u8], salt: &[u8]) -> String {
    let mut inner = Vec::with_capacity(password.len() + user.len());
    inner.extend_from_slice(password);
    inner.extend_from_slice(user.as_bytes());
    let mut outer = hex(&md5(&inner)).into_bytes();
    outer.extend_from_slice(salt);
    format!("md5{}", hex(&md5(&outer)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 (RFC 1321).
fn md5(input: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: [u32; 64] =
        std::array::from_fn(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32);
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut message = input.to_vec();
    let bit_len = (input.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_le_bytes());
    for block in message.chunks_exact(64) {
        let m: [u32; 16] = std::array::from_fn(|i| {
            u32::from_le_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ])
        });
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a
                .wrapping_add(f)
                .wrapping_add(k[i])
                .wrapping_add(m[g])
                .rotate_left(S[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(rotated);
        }
        state[0] = state[0].wrapping_add(a);
        state[1] = state[1].wrapping_add(b);
        state[2] = state[2].wrapping_add(c);
        state[3] = state[3].wrapping_add(d);
    }
    let mut out = [0u8; 16];
    for (i, word) in state.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_rfc_1321() {
        assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(&md5(b"abc")), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex(&md5(b"The quick brown fox jumps over the lazy dog")),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        // Two blocks.
        let long = [b'a'; 100];
        assert_eq!(hex(&md5(&long)), "36a92cc94a9e0fa21f625f8bfb007adf");
    }

    #[test]
    fn postgres_md5_answer() {
        // md5(md5("pass" + "user") + salt), as libpq computes it:
        // md5("passuser") = 0ba9ed9d1c7f2b8d7cd7c54ee5fa9c3a.
        let inner = hex(&md5(b"passuser"));
        let mut outer = inner.into_bytes();
        outer.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            md5_password("user", b"pass", &[1, 2, 3, 4]),
            format!("md5{}", hex(&md5(&outer)))
        );
        assert!(md5_password("u", b"p", b"salt").starts_with("md5"));
        assert_eq!(md5_password("u", b"p", b"salt").len(), 35);
    }

    #[test]
    fn scram_sha_256_matches_rfc_7677() {
        let (mut scram, first) = Scram::with_nonce("user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(first, "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first =
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = scram.client_final(server_first, b"pencil").expect("valid");
        assert_eq!(
            last,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            scram.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
        assert_eq!(
            scram.verify_server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(AuthError::ServerSignature)
        );
    }

    #[test]
    fn scram_refuses_what_a_server_must_not_send() {
        let (mut scram, _) = Scram::with_nonce("", "abc");
        assert_eq!(
            scram.client_final(b"r=xyz123,s=AAAA,i=4096", b"pw"),
            Err(AuthError::Nonce)
        );
        assert_eq!(
            scram.client_final(b"r=abc,s=AAAA,i=4096", b"pw"),
            Err(AuthError::Nonce),
            "the server must add to the nonce"
        );
        assert_eq!(
            scram.client_final(b"r=abcd,s=AAAA,i=0", b"pw"),
            Err(AuthError::Iterations(0))
        );
        assert_eq!(
            scram.client_final(b"r=abcd,s=AAAA,i=99999999999", b"pw"),
            Err(AuthError::Iterations(99_999_999_999))
        );
        assert!(scram.client_final(b"r=abcd,i=1", b"pw").is_err());
        assert!(scram.verify_server_final(b"v=x").is_err());
    }

    #[test]
    fn a_real_exchange_starts_with_a_fresh_nonce() {
        let random = ring::rand::SystemRandom::new();
        let (a, first_a) = Scram::start(&random).expect("random");
        let (_, first_b) = Scram::start(&random).expect("random");
        assert!(first_a.starts_with("n,,n=,r="));
        assert_ne!(first_a, first_b);
        assert_eq!(a.nonce.len(), 24);
    }
}
