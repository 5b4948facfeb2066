//! The C allocator's settings for a process that allocates tensor-sized blocks.
//!
//! Every kernel returns a fresh tensor, so a forward allocates and frees blocks of megabytes
//! all the time (PixArt at 512 px: 9.4 MB per linear layer's output, 37.7 MB for the
//! feed-forward's inner activation). glibc's defaults serve a block above its mmap threshold
//! (dynamic, capped at 32 MiB) with a fresh `mmap` and `munmap` it on free, so each such
//! tensor's pages are faulted in and zeroed by the kernel again, and with two threads every
//! `munmap` also flushes the other core's TLB. [`tune_allocator`] keeps blocks up to 64 MiB
//! in the heap and lets freed memory be reused instead of returned at once.

/// glibc `mallopt` parameters (`<malloc.h>`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    pub(super) const M_TRIM_THRESHOLD: i32 = -1;
    pub(super) const M_MMAP_THRESHOLD: i32 = -3;
    pub(super) const M_ARENA_MAX: i32 = -8;

    #[allow(unsafe_code)]
    unsafe extern "C" {
        /// glibc's `int mallopt(int param, int value)`: 1 on success, 0 on error.
        pub(super) fn mallopt(param: i32, value: i32) -> i32;
    }
}

/// Blocks served from the heap up to this size (larger ones are still mapped and unmapped).
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Free memory the heap keeps at its top before returning it to the system.
pub const TRIM_THRESHOLD: usize = 128 << 20;

/// Sets the process's C allocator (glibc only) for tensor-sized blocks: blocks up to
/// [`MMAP_THRESHOLD`] from the heap instead of fresh mappings, up to [`TRIM_THRESHOLD`] of
/// freed memory kept for reuse, and one arena for all threads (each rank thread would
/// otherwise keep its own cache of freed blocks). Returns whether the settings were applied
/// (`false` on other C libraries, where nothing is changed).
///
/// A setting of the whole process, for a binary's `main` to call once before it allocates
/// tensors (the `harness` binary does); a library embedding the kernels decides for itself.
/// Measured on a 2-core Intel Xeon (PixArt-XL-2-512, 28 blocks, one forward, see
/// docs/BENCH.md): 1.5 % faster at 1 thread and 2.6 % at 2, the same peak RSS; minor page
/// faults of an 8-block run 545 k → 217 k.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            (glibc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (glibc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (glibc::M_ARENA_MAX, 1),
        ];
        settings.iter().all(|&(param, value)| {
            let value = i32::try_from(value).unwrap_or(i32::MAX);
            // SAFETY: `mallopt` takes two ints and only changes the allocator's tunables; it
            // is safe to call at any time from any thread (glibc takes the arena locks).
            #[allow(unsafe_code)]
            let ok = unsafe { glibc::mallopt(param, value) };
            ok == 1
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// glibc's `struct mallinfo2` (`<malloc.h>`, glibc ≥ 2.33).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[repr(C)]
    #[derive(Default)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        /// Bytes in blocks served by their own mapping.
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    unsafe extern "C" {
        fn mallinfo2() -> MallInfo2;
    }

    /// Bytes the allocator holds in blocks mapped one by one.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn mapped_bytes() -> usize {
        // SAFETY: `mallinfo2` takes nothing and returns a plain struct by value.
        #[allow(unsafe_code)]
        unsafe {
            mallinfo2().hblkhd
        }
    }

    #[test]
    fn tuning_serves_tensor_sized_blocks_from_the_heap() {
        let applied = super::tune_allocator();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // 40 MiB: above glibc's default cap on its dynamic mmap threshold (32 MiB), so
        // mapped on its own without the tuning; below MMAP_THRESHOLD with it.
        let block = vec![1.0f32; (40 << 20) / 4];
        assert_eq!(block.iter().sum::<f32>(), block.len() as f32);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(
            mapped_bytes() < 40 << 20,
            "a 40 MiB block was mapped on its own: {} bytes mapped",
            mapped_bytes()
        );
    }
}
