//! Shared-secret files: what a usable secret is, and how to make one.
//!
//! Nodes and the directory read the secret file's bytes, trimmed of
//! surrounding ASCII whitespace, and use them as they are (any bytes work;
//! a hex text is *not* decoded). Everything a link protects rests on that
//! secret, so a guessable one is refused at start-up rather than trusted.
//! The checks are cheap heuristics that catch the secrets people actually
//! type, not a proof of randomness; `vmsyncctl gen-secret` makes one that
//! passes with a wide margin (64 hex digits: 256 bits).
//!
//! A secret is refused when it is
//!
//! 1. shorter than [`MIN_SECRET_LEN`] bytes;
//! 2. made of fewer than [`MIN_DISTINCT_BYTES`] distinct byte values
//!    (`aaaa…`, `0101…`, `abcabc…`);
//! 3. one shorter unit repeated (`passwordpassword`, `hunter2hunter2…`);
//! 4. a run with a constant step (`abcdefghijklmnop`, bytes 0, 1, 2, …);
//! 5. worth fewer than [`MIN_ESTIMATED_BITS`] by a character-class estimate:
//!    length × log2(size of the alphabet its characters come from), where
//!    the alphabet is the union of the classes used (digits 10, lower case
//!    26, upper case 26, other printable ASCII 33), or 256 as soon as one
//!    byte is outside printable ASCII (binary). That rejects short words
//!    and short hex strings (a lower-case word needs 21 letters, a hex text
//!    19 digits) and accepts 16 random raw bytes (128) and passphrases of
//!    several words.

use rand::rngs::OsRng;
use rand::RngCore;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Fewest distinct byte values accepted.
pub const MIN_DISTINCT_BYTES: usize = 8;

/// Least estimated strength accepted, in bits (see the module docs).
pub const MIN_ESTIMATED_BITS: f64 = 96.0;

/// Random bytes in a generated secret.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// Why a secret is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeakSecret {
    #[error("it holds {len} bytes; a shared secret needs at least {MIN_SECRET_LEN}")]
    TooShort { len: usize },
    #[error(
        "it uses only {distinct} distinct byte values; at least {MIN_DISTINCT_BYTES} are needed"
    )]
    TooFewDistinct { distinct: usize },
    #[error("it is a {unit}-byte pattern repeated")]
    Repeated { unit: usize },
    #[error("it is a run of bytes with a constant step (like abcdef… or 012345…)")]
    Sequence,
    #[error("it is too guessable: about {bits:.0} bits by its length and characters, at least {MIN_ESTIMATED_BITS:.0} are needed")]
    Guessable { bits: f64 },
}

/// Checks that `secret` (already trimmed) is long and random-looking
/// enough; see the module docs for the rules.
pub fn check_secret(secret: &[u8]) -> Result<(), WeakSecret> {
    let len = secret.len();
    if len < MIN_SECRET_LEN {
        return Err(WeakSecret::TooShort { len });
    }
    let mut seen = [false; 256];
    for &b in secret {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < MIN_DISTINCT_BYTES {
        return Err(WeakSecret::TooFewDistinct { distinct });
    }
    if let Some(unit) = (1..=len / 2).find(|&p| secret[p..] == secret[..len - p]) {
        return Err(WeakSecret::Repeated { unit });
    }
    let step = secret[1].wrapping_sub(secret[0]);
    if secret.windows(2).all(|w| w[1].wrapping_sub(w[0]) == step) {
        return Err(WeakSecret::Sequence);
    }
    let bits = estimated_bits(secret);
    if bits < MIN_ESTIMATED_BITS {
        return Err(WeakSecret::Guessable { bits });
    }
    Ok(())
}

/// Length × log2(alphabet size) by character class (module docs, rule 5).
fn estimated_bits(secret: &[u8]) -> f64 {
    let (mut digit, mut lower, mut upper, mut other) = (false, false, false, false);
    for &b in secret {
        match b {
            b'0'..=b'9' => digit = true,
            b'a'..=b'z' => lower = true,
            b'A'..=b'Z' => upper = true,
            b' '..=b'~' => other = true,
            // Outside printable ASCII: treat as binary.
            _ => return secret.len() as f64 * 8.0,
        }
    }
    let alphabet = [(digit, 10), (lower, 26), (upper, 26), (other, 33)]
        .iter()
        .filter(|(used, _)| *used)
        .map(|(_, n)| n)
        .sum::<u32>();
    secret.len() as f64 * f64::from(alphabet).log2()
}

/// A fresh secret from the OS's random source: [`GENERATED_SECRET_BYTES`]
/// random bytes as lower-case hex text with a trailing newline (printable,
/// so it survives copying between machines; its bytes are used as they are).
pub fn generate_secret() -> String {
    let mut key = [0u8; GENERATED_SECRET_BYTES];
    OsRng.fill_bytes(&mut key);
    let mut text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an error is the expected kind.
    type Expect = fn(&WeakSecret) -> bool;

    #[test]
    fn weak_secrets_are_refused_with_the_reason() {
        let cases: [(&[u8], Expect); 9] = [
            (b"short", |e| matches!(e, WeakSecret::TooShort { len: 5 })),
            (&[0x41; 32], |e| {
                matches!(e, WeakSecret::TooFewDistinct { distinct: 1 })
            }),
            (b"0101010101010101", |e| {
                matches!(e, WeakSecret::TooFewDistinct { .. })
            }),
            (b"pass1word!pass1word!", |e| {
                matches!(e, WeakSecret::Repeated { unit: 10 })
            }),
            (b"hunter2!hunter2!hunter2!", |e| {
                matches!(e, WeakSecret::Repeated { unit: 8 })
            }),
            (b"abcdefghijklmnopqrstuvwxyz", |e| {
                matches!(e, WeakSecret::Sequence)
            }),
            (
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                |e| matches!(e, WeakSecret::Sequence),
            ),
            (b"0123456789abcdef", |e| {
                matches!(e, WeakSecret::Guessable { .. })
            }),
            (b"supercalifragilistic", |e| {
                matches!(e, WeakSecret::Guessable { .. })
            }),
        ];
        for (secret, expected) in cases {
            let err = check_secret(secret).unwrap_err();
            assert!(
                expected(&err),
                "{:?}: {err:?}",
                String::from_utf8_lossy(secret)
            );
        }
    }

    #[test]
    fn strong_secrets_pass() {
        for secret in [
            &b"correct horse battery staple"[..],
            b"directory-test-secret-0123456789",
            &[
                0x8e, 0x12, 0xf0, 0x33, 0x07, 0xa9, 0x5c, 0xd1, 0x6b, 0x20, 0x94, 0xee, 0x4f, 0x78,
                0xb3, 0x01,
            ],
        ] {
            assert_eq!(check_secret(secret), Ok(()), "{secret:?}");
        }
        for _ in 0..100 {
            let s = generate_secret();
            assert_eq!(check_secret(s.trim().as_bytes()), Ok(()), "{s}");
        }
    }

    #[test]
    fn generated_secrets_are_64_hex_digits_and_differ() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 65);
        assert!(a.ends_with('\n'));
        assert!(a
            .trim()
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
