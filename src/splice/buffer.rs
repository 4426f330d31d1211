//! Copy buffers, lent out only while bytes are in flight.
//!
//! An idle connection holds no buffer: a direction takes one from a small
//! per-thread pool when its source has bytes, and gives it back as soon as
//! everything in it has been written. A connection that went quiet costs its
//! sockets and its key schedule, not 2 × 64 KiB.
//!
//! A [`Chunk`] is a buffer plus the parts of it that hold bytes to send:
//! one segment when read from a plain socket, one per TLS record when
//! decrypted in place (each record's plaintext sits between its header and
//! its tag). Room can be left before and after a segment so that a TLS leg
//! can seal it in place (header before, content type and tag after).

use std::cell::RefCell;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes per buffer: four full TLS records of ciphertext (or one read of
/// plain bytes), so one read and one write move a burst, not a record.
pub const CAPACITY: usize = 64 * 1024 + 512;

/// Segments one chunk can describe (one per decrypted record).
pub const MAX_SEGMENTS: usize = 16;

/// Buffers kept per thread for reuse; more are freed when returned.
const POOLED_PER_THREAD: usize = 32;

/// Buffers lent out right now, across the process.
static LENT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// How many buffers are lent out (held by connections) right now: zero when
/// every connection is idle.
pub fn lent() -> usize {
    LENT.load(Ordering::Relaxed)
}

/// A pooled buffer; goes back to the pool when dropped.
pub struct Buffer {
    bytes: Option<Box<[u8]>>,
}

impl Buffer {
    pub fn take() -> Buffer {
        let bytes = POOL
            .try_with(|pool| pool.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| vec![0; CAPACITY].into_boxed_slice());
        LENT.fetch_add(1, Ordering::Relaxed);
        Buffer { bytes: Some(bytes) }
    }

    pub fn as_slice(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or(&[])
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        LENT.fetch_sub(1, Ordering::Relaxed);
        if let Some(bytes) = self.bytes.take() {
            // During thread teardown the pool is gone: just free.
            let _ = POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOLED_PER_THREAD {
                    pool.push(bytes);
                }
            });
        }
    }
}

/// Space a leg needs around the bytes it is given, to frame them in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Free bytes before the segment (a TLS record header, an explicit nonce).
    pub head: usize,
    /// Free bytes after it (TLS 1.3's content type, the AEAD tag).
    pub tail: usize,
    /// The most bytes one segment may hold (a TLS record's plaintext).
    pub max: usize,
}

impl Room {
    /// A plain socket: no framing, as much as the buffer holds.
    pub const NONE: Room = Room {
        head: 0,
        tail: 0,
        max: CAPACITY,
    };

    /// Where to read plain bytes so that they can be framed in place.
    pub fn read_area(self) -> Range<usize> {
        let start = self.head.min(CAPACITY);
        let end = (start + self.max).min(CAPACITY.saturating_sub(self.tail));
        start..end.max(start)
    }
}

/// A buffer and the segments of it that still have to be sent.
pub struct Chunk {
    buf: Buffer,
    segments: [(u32, u32); MAX_SEGMENTS],
    /// Segments `first..count` are unsent.
    first: usize,
    count: usize,
    /// Set by a leg that framed the bytes in place (sealed them as a TLS
    /// record): what is left is ready for the wire as it is.
    pub framed: bool,
}

impl Chunk {
    pub fn take() -> Chunk {
        Chunk {
            buf: Buffer::take(),
            segments: [(0, 0); MAX_SEGMENTS],
            first: 0,
            count: 0,
            framed: false,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    /// Forgets every segment.
    pub fn clear(&mut self) {
        self.first = 0;
        self.count = 0;
        self.framed = false;
    }

    /// Adds a segment to send (empty ones are skipped). False when the
    /// chunk describes as many segments as it can.
    pub fn push(&mut self, range: Range<usize>) -> bool {
        if range.is_empty() {
            return true;
        }
        if self.count == MAX_SEGMENTS {
            return false;
        }
        self.segments[self.count] = (range.start as u32, range.end as u32);
        self.count += 1;
        true
    }

    pub fn is_full(&self) -> bool {
        self.count == MAX_SEGMENTS
    }

    pub fn is_empty(&self) -> bool {
        self.first == self.count
    }

    /// Bytes still to send.
    pub fn len(&self) -> usize {
        self.segments[self.first..self.count]
            .iter()
            .map(|&(s, e)| (e - s) as usize)
            .sum()
    }

    /// The one unsent segment, if there is exactly one.
    pub fn single(&self) -> Option<Range<usize>> {
        if self.count - self.first == 1 {
            let (s, e) = self.segments[self.first];
            Some(s as usize..e as usize)
        } else {
            None
        }
    }

    /// Replaces the one unsent segment (after framing it in place).
    pub fn set_single(&mut self, range: Range<usize>) {
        self.first = 0;
        self.count = 0;
        self.push(range);
    }

    /// The unsent segments as slices, for one vectored write.
    pub fn io_slices<'s>(&'s self, out: &mut [IoSlice<'s>; MAX_SEGMENTS]) -> usize {
        let bytes = self.buf.as_slice();
        let mut n = 0;
        for &(s, e) in &self.segments[self.first..self.count] {
            out[n] = IoSlice::new(&bytes[s as usize..e as usize]);
            n += 1;
        }
        n
    }

    /// The unsent segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        let bytes = self.buf.as_slice();
        self.segments[self.first..self.count]
            .iter()
            .map(move |&(s, e)| &bytes[s as usize..e as usize])
    }

    /// The first unsent segment.
    pub fn front(&self) -> &[u8] {
        match self.segments.get(self.first) {
            Some(&(s, e)) if self.first < self.count => {
                &self.buf.as_slice()[s as usize..e as usize]
            }
            _ => &[],
        }
    }

    /// Marks `n` bytes (from the front) as sent.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.count {
            let (s, e) = &mut self.segments[self.first];
            let here = (*e - *s) as usize;
            if n < here {
                *s += n as u32;
                return;
            }
            n -= here;
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_sends_its_segments_in_order_across_partial_writes() {
        let mut c = Chunk::take();
        c.bytes_mut()[..10].copy_from_slice(b"0123456789");
        assert!(c.push(1..3));
        assert!(c.push(5..5), "empty segments are skipped");
        assert!(c.push(6..9));
        assert_eq!(c.len(), 5);
        assert_eq!(c.single(), None);
        let mut slices = [IoSlice::new(&[]); MAX_SEGMENTS];
        let n = c.io_slices(&mut slices);
        let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(joined, b"12678");
        c.advance(3);
        assert_eq!(c.front(), b"78");
        assert_eq!(c.single(), Some(7..9));
        c.advance(2);
        assert!(c.is_empty());
    }

    #[test]
    fn a_chunk_holds_at_most_max_segments() {
        let mut c = Chunk::take();
        for i in 0..MAX_SEGMENTS {
            assert!(c.push(i..i + 1));
        }
        assert!(c.is_full());
        assert!(!c.push(100..101));
    }

    #[test]
    fn a_returned_buffer_is_reused_by_its_thread() {
        let a = Buffer::take();
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let b = Buffer::take();
        assert_eq!(
            b.as_slice().as_ptr(),
            ptr,
            "the same thread reuses its buffer"
        );
        assert_eq!(b.as_slice().len(), CAPACITY);
    }

    #[test]
    fn the_read_area_leaves_room_for_framing() {
        let room = Room {
            head: 5,
            tail: 17,
            max: 16 * 1024,
        };
        assert_eq!(room.read_area(), 5..5 + 16 * 1024);
        assert_eq!(Room::NONE.read_area(), 0..CAPACITY);
    }
}
