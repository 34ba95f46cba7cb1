//! The link writer's send batch: the frames of one batch leave in one `writev`. Headers and
//! small bodies are copied together; bulk bodies (write data) are sent from their own
//! buffers, not copied.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::wire::Frame;

/// Bodies up to this size are copied next to their header; larger ones are sent in place.
const COPY_MAX: usize = 512;
/// I/O vectors per `writev` (far below the kernel's `UIO_MAXIOV`).
const MAX_PARTS: usize = 64;
/// A batch is written out once it holds this many bytes.
const BYTES_MAX: usize = 256 << 10;

/// Frames waiting for the next `writev`.
pub(super) struct Gather {
    /// Headers and small bodies since the last part.
    small: BytesMut,
    /// What the next `writev` sends, in order (`small` goes last).
    parts: Vec<Bytes>,
    len: usize,
}

impl Gather {
    pub(super) fn new() -> Gather {
        Gather {
            small: BytesMut::with_capacity(16 << 10),
            parts: Vec::with_capacity(MAX_PARTS),
            len: 0,
        }
    }

    pub(super) fn push(&mut self, frame: Frame) {
        self.len += frame.head.len() + frame.body.len();
        self.small.extend_from_slice(&frame.head);
        if frame.body.len() <= COPY_MAX {
            self.small.extend_from_slice(&frame.body);
        } else {
            self.parts.push(self.small.split().freeze());
            self.parts.push(frame.body);
        }
    }

    /// Whether the batch should be written before another frame is added.
    pub(super) fn is_full(&self) -> bool {
        self.len >= BYTES_MAX || self.parts.len() + 3 > MAX_PARTS
    }

    /// Write everything, in as few `writev` calls as the socket takes.
    pub(super) async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        if !self.small.is_empty() {
            self.parts.push(self.small.split().freeze());
        }
        let mut first = 0;
        while first < self.parts.len() {
            let mut iov = [IoSlice::new(&[]); MAX_PARTS];
            let count = (self.parts.len() - first).min(MAX_PARTS);
            for (slot, part) in iov.iter_mut().zip(&self.parts[first..first + count]) {
                *slot = IoSlice::new(part);
            }
            let mut written = w.write_vectored(&iov[..count]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let part = &mut self.parts[first];
                let n = written.min(part.len());
                part.advance(n);
                written -= n;
                if part.is_empty() {
                    first += 1;
                }
            }
        }
        self.parts.clear();
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that takes at most `chunk` bytes per call, as a full socket does.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.chunk;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(self.chunk - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frame(i: u8, body: usize) -> Frame {
        Frame {
            head: Bytes::from(vec![i; 24]),
            body: Bytes::from(vec![i.wrapping_add(100); body]),
        }
    }

    /// Frames with small and bulk bodies arrive whole and in order, also when the writer
    /// takes a few bytes at a time, and a batch of them is one write on a roomy socket.
    #[tokio::test]
    async fn frames_leave_whole_and_in_order() {
        let frames: Vec<Frame> = (0..20u8)
            .map(|i| frame(i, [0, 16, 4096, 65536][usize::from(i) % 4]))
            .collect();
        let expected: Vec<u8> = frames
            .iter()
            .flat_map(|f| f.head.iter().chain(f.body.iter()).copied())
            .collect();
        for chunk in [1 << 30, 7, 4095] {
            let mut gather = Gather::new();
            let mut w = Trickle {
                out: Vec::new(),
                chunk,
                calls: 0,
            };
            for f in frames.iter().cloned() {
                if gather.is_full() {
                    gather.write_to(&mut w).await.unwrap();
                }
                gather.push(f);
            }
            gather.write_to(&mut w).await.unwrap();
            assert_eq!(w.out, expected, "chunk {chunk}");
            if chunk == 1 << 30 {
                assert_eq!(w.calls, 2, "a 256 KiB batch, then the rest");
            }
            // Nothing is left for the next batch.
            gather.write_to(&mut w).await.unwrap();
            assert_eq!(w.out.len(), expected.len());
        }
    }
}
