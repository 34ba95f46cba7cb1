//! Page-aligned byte buffers for `O_DIRECT` I/O.
//!
//! `O_DIRECT` needs the memory address, the file offset and the length aligned to the
//! device's block size. [`AlignedBuf`] owns memory aligned to [`ALIGN`], which satisfies
//! every block size Linux uses (512 B to 4 KiB), and can become a `bytes::Bytes` without a
//! copy, so a read lands straight in the buffer a frontend replies with. Large buffers are
//! reused through [`super::buffer_pool`].

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use super::buffer_pool;

/// Alignment of memory, offsets and lengths for direct I/O.
pub const ALIGN: usize = 4096;

/// True when `offset` and `len` are both multiples of [`ALIGN`].
pub fn is_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// True when `buf` starts at an [`ALIGN`]ed address and its length is a multiple of it.
pub fn is_aligned_slice(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN) && buf.len().is_multiple_of(ALIGN)
}

/// A heap buffer of `len` bytes starting at an [`ALIGN`]ed address.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        // Rounded up to whole blocks (never zero-sized), so direct I/O may fill the tail,
        // and large ones to the pool's size classes.
        let size = buffer_pool::class_size(len.div_ceil(ALIGN).max(1) * ALIGN);
        match Layout::from_size_align(size, ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("buffer of {len} bytes exceeds the address space"),
        }
    }

    /// A zero-filled buffer.
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer whose bytes are not initialised. Only [`AlignedBuf::as_mut_ptr`] may be used
    /// until the caller has written all `len` bytes; see [`AlignedBuf::assume_filled`].
    pub(crate) fn uninit(len: usize) -> Uninit {
        let layout = Self::layout(len);
        if let Some(ptr) = buffer_pool::take(layout.size()) {
            return Uninit(AlignedBuf { ptr, len, layout });
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Uninit(AlignedBuf { ptr, len, layout })
    }

    /// The start of the buffer, for system calls that write into it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shorten the buffer to `len` bytes (no-op when already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// An aligned buffer filled front to back through [`bytes::BufMut`] (e.g. tokio's
/// `read_buf`), never zero-filled; [`AlignedBufMut::freeze`] hands out the filled part.
/// Frontends read request payloads into it, so aligned writes need no bounce copy.
pub struct AlignedBufMut {
    buf: AlignedBuf,
    filled: usize,
    capacity: usize,
}

impl AlignedBufMut {
    /// Room for `capacity` bytes, none filled yet.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = AlignedBuf::uninit(capacity).0;
        buf.len = 0;
        AlignedBufMut {
            buf,
            filled: 0,
            capacity,
        }
    }

    /// Bytes filled so far.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when nothing was filled yet.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// The filled bytes, without a copy.
    pub fn freeze(mut self) -> bytes::Bytes {
        self.buf.len = self.filled;
        bytes::Bytes::from_owner(self.buf)
    }
}

// SAFETY: `chunk_mut` covers exactly the unfilled tail of our allocation, and `advance_mut`
// only counts bytes the caller has written there (its contract), so the first `filled`
// bytes are always initialised.
unsafe impl bytes::BufMut for AlignedBufMut {
    fn remaining_mut(&self) -> usize {
        self.capacity - self.filled
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(
            cnt <= self.remaining_mut(),
            "advance past the end of the buffer"
        );
        self.filled += cnt;
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        // SAFETY: the allocation holds `capacity` bytes; the tail from `filled` is ours.
        unsafe {
            bytes::buf::UninitSlice::from_raw_parts_mut(
                self.buf.as_mut_ptr().add(self.filled),
                self.capacity - self.filled,
            )
        }
    }
}

/// An [`AlignedBuf`] not yet filled; reading it is impossible until it is.
pub(crate) struct Uninit(AlignedBuf);

impl Uninit {
    /// Where the kernel writes the data.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    /// # Safety
    /// All `len` bytes have been written.
    pub(crate) unsafe fn assume_filled(self) -> AlignedBuf {
        self.0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Every pooled allocation has the layout `layout(len)` gives its size: ALIGN.
        if buffer_pool::give(self.ptr, self.layout.size()) {
            return;
        }
        // SAFETY: allocated in `zeroed`/`uninit` (or taken from the pool, which holds only
        // such allocations) with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes are initialised (zeroed, or filled before `assume_filled`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn buf_mut_fills_and_freezes_aligned() {
        use bytes::BufMut;
        let mut buf = AlignedBufMut::with_capacity(8192);
        buf.put_slice(&[7u8; 5000]);
        buf.put_slice(&[9u8; 3192]);
        assert_eq!(buf.remaining_mut(), 0);
        let bytes = buf.freeze();
        assert_eq!(bytes.as_ptr() as usize % ALIGN, 0);
        assert_eq!(bytes.len(), 8192);
        assert!(bytes[..5000].iter().all(|&b| b == 7) && bytes[5000..].iter().all(|&b| b == 9));
        assert!(AlignedBufMut::with_capacity(100).freeze().is_empty());
    }

    #[test]
    fn alignment_checks() {
        assert!(is_aligned(8192, 4096));
        assert!(!is_aligned(512, 4096));
        assert!(!is_aligned(0, 512));
        assert!(is_aligned_slice(&AlignedBuf::zeroed(8192)));
        assert!(!is_aligned_slice(&AlignedBuf::zeroed(8192)[1..4097]));
    }
}
