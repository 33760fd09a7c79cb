//! Sealing stored bytes at rest: AES-256-GCM (RustCrypto `aes-gcm`), a
//! fresh random nonce per seal, and associated data that binds the bytes to
//! where they belong (the record key's hash), so a sealed record copied to
//! another key does not open.
//!
//! Envelope: `0xE1`, key id length (u8), key id, 12-byte nonce, ciphertext
//! with its 16-byte tag. The first key of a [`Keyring`] seals; every key
//! opens what names it, so keys rotate without a flag day.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};

/// First byte of a sealed envelope (never a record encoding version).
pub const SEALED: u8 = 0xE1;
const NONCE: usize = 12;

/// Why sealed bytes did not open. Callers treat every case as a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed envelope")]
    NotSealed,
    #[error("sealed with a key this keyring does not hold")]
    UnknownKey,
    #[error("does not open: tampered, or sealed for another place")]
    Tampered,
}

/// A bad key at load time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key id must be 1 to 255 bytes")]
    BadId,
    #[error("key must be 32 bytes (256 bits), got {0}")]
    BadLength(usize),
}

/// The keys records are sealed with: the first seals, all open.
pub struct Keyring {
    keys: Vec<(String, Aes256Gcm)>,
}

impl Keyring {
    /// From (id, 32-byte key) pairs, sealing key first.
    pub fn new(keys: &[(String, Vec<u8>)]) -> Result<Self, KeyError> {
        let mut out = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            if id.is_empty() || id.len() > 255 {
                return Err(KeyError::BadId);
            }
            let cipher =
                Aes256Gcm::new_from_slice(key).map_err(|_| KeyError::BadLength(key.len()))?;
            out.push((id.clone(), cipher));
        }
        Ok(Keyring { keys: out })
    }

    /// Seals `plain` for the place named by `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let (id, cipher) = &self.keys[0];
        let nonce: [u8; NONCE] = rand::random();
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            // Only fails for inputs beyond AES-GCM's 64 GiB bound.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE + sealed.len());
        out.push(SEALED);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`Keyring::seal`] sealed for the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&tag, rest) = sealed.split_first().ok_or(SealError::NotSealed)?;
        if tag != SEALED {
            return Err(SealError::NotSealed);
        }
        let (&len, rest) = rest.split_first().ok_or(SealError::Tampered)?;
        let len = usize::from(len);
        if rest.len() < len + NONCE {
            return Err(SealError::Tampered);
        }
        let (id, rest) = rest.split_at(len);
        let (nonce, body) = rest.split_at(NONCE);
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(k, _)| k.as_bytes() == id)
            .ok_or(SealError::UnknownKey)?;
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
            .map_err(|_| SealError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[(&str, u8)]) -> Keyring {
        let keys: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|(id, b)| (id.to_string(), vec![*b; 32]))
            .collect();
        Keyring::new(&keys).unwrap()
    }

    #[test]
    fn seals_open_only_in_their_place_with_their_key() {
        let k1 = ring(&[("k1", 1)]);
        let sealed = k1.seal(b"place-a", b"card 4242");
        assert!(!sealed.windows(4).any(|w| w == b"4242"));
        assert_eq!(k1.open(b"place-a", &sealed).unwrap(), b"card 4242");
        // A fresh nonce each time.
        assert_ne!(k1.seal(b"place-a", b"card 4242"), sealed);
        assert_eq!(k1.open(b"place-b", &sealed), Err(SealError::Tampered));
        let mut bent = sealed.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert_eq!(k1.open(b"place-a", &bent), Err(SealError::Tampered));
        assert_eq!(k1.open(b"place-a", b"\x01plain"), Err(SealError::NotSealed));
        assert_eq!(k1.open(b"place-a", &sealed[..5]), Err(SealError::Tampered));
        assert_eq!(k1.open(b"place-a", &[]), Err(SealError::NotSealed));
    }

    #[test]
    fn rotation_opens_old_seals_until_the_old_key_goes() {
        let old = ring(&[("k1", 1)]).seal(b"a", b"x");
        let rotated = ring(&[("k2", 2), ("k1", 1)]);
        assert_eq!(rotated.open(b"a", &old).unwrap(), b"x");
        let new = rotated.seal(b"a", b"y");
        assert_eq!(new[2..4], *b"k2");
        let dropped = ring(&[("k2", 2)]);
        assert_eq!(dropped.open(b"a", &old), Err(SealError::UnknownKey));
        assert_eq!(dropped.open(b"a", &new).unwrap(), b"y");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            Keyring::new(&[("k".into(), vec![0; 16])]).err(),
            Some(KeyError::BadLength(16))
        );
        assert_eq!(
            Keyring::new(&[(String::new(), vec![0; 32])]).err(),
            Some(KeyError::BadId)
        );
    }
}
