//! Where session ids come from: the operating system's CSPRNG, read a block at a time.
//!
//! A `getrandom` system call costs several hundred nanoseconds however few bytes it
//! returns, while the kernel's generator itself produces 16 bytes in a fraction of
//! that. So each thread reads [`BLOCK`] bytes at once and hands them out 16 at a time.
//! Every id is still bytes the kernel produced, used once, never stretched by a
//! generator of ours.
//!
//! A buffer must never be shared between two processes: a child made by `fork`
//! starts with a copy of its parent's memory, and would hand out the ids its parent
//! is about to hand out. `forkguard`'s `pthread_atfork` handler counts forks, and a
//! thread whose buffer was filled before the last fork throws it away unread.
//! Bytes are wiped from the buffer as they are handed out.

use std::cell::RefCell;

/// Bytes read from the operating system per system call: 256 ids.
pub(crate) const BLOCK: usize = 4096;

/// One thread's unused random bytes.
struct Buffer {
    bytes: [u8; BLOCK],
    /// Where the unused bytes start; `BLOCK` when there are none.
    next: usize,
    /// Says when this process is a fork child of the one that filled `bytes`.
    fork: forkguard::Guard,
}

impl Buffer {
    fn take(&mut self) -> Result<[u8; 16], getrandom::Error> {
        if self.fork.detected_fork() {
            // Inherited from the parent, which may still hand these out itself.
            self.bytes = [0; BLOCK];
            self.next = BLOCK;
        }
        if self.next == BLOCK {
            getrandom::fill(&mut self.bytes)?;
            self.next = 0;
        }
        let used = &mut self.bytes[self.next..self.next + 16];
        let mut id = [0u8; 16];
        id.copy_from_slice(used);
        used.fill(0);
        self.next += 16;
        Ok(id)
    }
}

thread_local! {
    static BUFFER: RefCell<Option<Buffer>> = const { RefCell::new(None) };
}

/// Returns 16 bytes of the operating system's CSPRNG output that no other call, in
/// this process or any process forked from it, returns.
pub(crate) fn bytes16() -> Result<[u8; 16], getrandom::Error> {
    let buffered = BUFFER.try_with(|cell| {
        // Never re-entered (nothing here calls back into user code); a thread in its
        // exit, or a process where pthread_atfork failed, reads directly instead.
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = Some(Buffer {
                bytes: [0; BLOCK],
                next: BLOCK,
                fork: forkguard::Guard::try_new().ok()?,
            });
        }
        slot.as_mut().map(Buffer::take)
    });
    match buffered {
        Ok(Some(taken)) => taken,
        _ => {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes)?;
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_distinct_ids_across_refills() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(3 * BLOCK / 16 + 5) {
            assert!(seen.insert(bytes16().unwrap()), "an id came out twice");
        }
    }

    #[test]
    fn wipes_what_it_hands_out() {
        let first = bytes16().unwrap();
        BUFFER.with(|cell| {
            let slot = cell.borrow();
            let buffer = slot.as_ref().expect("filled by the first call");
            assert!(buffer.bytes[..buffer.next].iter().all(|&b| b == 0));
            assert!(buffer.next <= BLOCK);
        });
        assert_ne!(first, [0; 16]);
    }

    #[test]
    fn threads_have_their_own_buffers() {
        let here: Vec<_> = (0..8).map(|_| bytes16().unwrap()).collect();
        let there = std::thread::spawn(|| (0..8).map(|_| bytes16().unwrap()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert!(here.iter().all(|id| !there.contains(id)));
    }
}
