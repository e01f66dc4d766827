//! Ids stay unique across `fork`: a child process must not hand out the random bytes
//! its parent had buffered and is about to hand out itself.

#![cfg(unix)]

use std::io::{Read, Write};

use portable_sessions::session::Id;

const DRAWS: usize = 32;

#[test]
fn a_forked_child_never_repeats_its_parents_ids() {
    // Fills this thread's buffer: the child starts with a copy of it.
    let before = Id::default();
    let (mut reader, mut writer) = std::io::pipe().expect("a pipe");
    match fork::fork().expect("fork") {
        fork::Fork::Child => {
            // Only what is safe between fork and exit: no allocation, no locks.
            let mut out = [0u8; 16 * DRAWS];
            for chunk in out.chunks_exact_mut(16) {
                chunk.copy_from_slice(&Id::default().to_bytes());
            }
            let code = i32::from(writer.write_all(&out).is_err());
            std::process::exit(code);
        }
        fork::Fork::Parent(child) => {
            drop(writer);
            let parent: Vec<Id> = (0..DRAWS).map(|_| Id::default()).collect();
            let mut out = Vec::new();
            reader.read_to_end(&mut out).expect("the child's ids");
            let status = fork::waitpid(child).expect("waitpid");
            assert_eq!(status, 0, "the child failed to report its ids");
            assert_eq!(out.len(), 16 * DRAWS);
            let child: Vec<Id> = out
                .chunks_exact(16)
                .map(|chunk| Id::from_bytes(chunk.try_into().expect("16 bytes")))
                .collect();
            for id in &child {
                assert!(!parent.contains(id), "parent and child drew the same id");
                assert_ne!(*id, before);
            }
            let mut all: Vec<Id> = parent.iter().chain(&child).copied().collect();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), 2 * DRAWS);
        }
    }
}
