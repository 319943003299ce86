//! Fixed-size little-endian fields of the on-disk headers (record, segment, snapshot). Each
//! header type names its field offsets and asserts at compile time that they tile its `LEN`;
//! these helpers read and write one field of a header held as a fixed-size array, so the
//! bounds are known to the compiler and checked once, where the array is taken.

use std::fmt;

/// Input shorter than the fixed-size header it should start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortInput {
    /// Bytes the header takes.
    pub needed: usize,
    /// Bytes there were.
    pub got: usize,
}

impl fmt::Display for ShortInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, expected {}", self.got, self.needed)
    }
}

impl std::error::Error for ShortInput {}

/// The first `N` bytes of `bytes` as an array, or how short they are.
#[inline]
pub(crate) fn prefix<const N: usize>(bytes: &[u8]) -> Result<&[u8; N], ShortInput> {
    bytes.first_chunk::<N>().ok_or(ShortInput { needed: N, got: bytes.len() })
}

/// The `W` bytes of `header` at `at`. Callers pass named offsets that a compile-time assert
/// keeps within `N`, so the bounds check folds away.
#[inline]
pub(crate) fn get<const W: usize, const N: usize>(header: &[u8; N], at: usize) -> [u8; W] {
    debug_assert!(at + W <= N);
    let mut field = [0; W];
    field.copy_from_slice(&header[at..at + W]);
    field
}

/// Writes `field` into `header` at `at` (see [`get`]).
#[inline]
pub(crate) fn put<const W: usize, const N: usize>(header: &mut [u8; N], at: usize, field: [u8; W]) {
    debug_assert!(at + W <= N);
    header[at..at + W].copy_from_slice(&field);
}

/// A little-endian `u32` at `at` of `header`.
#[inline]
pub(crate) fn u32_at<const N: usize>(header: &[u8; N], at: usize) -> u32 {
    u32::from_le_bytes(get(header, at))
}

/// A little-endian `u64` at `at` of `header`.
#[inline]
pub(crate) fn u64_at<const N: usize>(header: &[u8; N], at: usize) -> u64 {
    u64::from_le_bytes(get(header, at))
}
