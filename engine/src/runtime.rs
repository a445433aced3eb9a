//! Process-level settings that affect speed only, never results.

/// Asks glibc's allocator to keep freed memory for reuse instead of returning large blocks to
/// the OS after every op (each fresh block costs page faults and kernel zeroing, which can be
/// a third of a gradient's time), and to serve every thread from that one warm arena (the
/// work runs on pool workers, and per-thread arenas return their large blocks to the OS).
/// Call once at program start; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tuning parameters.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_ARENA_MAX, 1);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}
