//! Gives the heap's free memory back to the system after a burst of client
//! connections has ended. glibc's allocator keeps what a burst freed in its
//! arenas (free chunks between live ones are never unmapped on their own):
//! 5,000 keep-alive clients that connect, idle and leave kept ~100 MiB
//! resident for good, until `malloc_trim` hands the free pages back (16 MiB
//! again). HAProxy trims likewise when it releases its pools.

/// A peak below this many open client connections leaves too little behind
/// to be worth a trim (which walks every arena under its lock).
const MIN_PEAK: usize = 256;

/// When to trim: the open connections have fallen to half of a peak of at
/// least [`MIN_PEAK`] since the last trim. A steady load, however much it
/// churns, never asks for one.
#[derive(Debug, Default)]
pub(super) struct BurstTrim {
    peak: usize,
}

impl BurstTrim {
    /// Takes a housekeeping tick's peak and current count of open
    /// connections; true when the heap should be trimmed now.
    pub(super) fn burst_ended(&mut self, tick_peak: usize, open: usize) -> bool {
        self.peak = self.peak.max(tick_peak).max(open);
        if self.peak >= MIN_PEAK && open <= self.peak / 2 {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Returns the allocator's free pages to the system (glibc only: other
/// allocators give memory back on their own or not at all).
pub(super) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory no allocation holds, and is
    // safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_when_a_burst_has_halved_and_never_under_a_steady_load() {
        let mut trim = BurstTrim::default();
        // A steady load below the minimum peak, however it varies.
        for (peak, open) in [(10, 10), (255, 200), (200, 3), (255, 255), (40, 0), (128, 128)] {
            assert!(!trim.burst_ended(peak, open), "trimmed at {open} open under a steady load");
        }
        // A burst: nothing while it grows or holds, nor at just over half.
        for (peak, open) in [(1_000, 1_000), (5_000, 5_000), (5_000, 5_000), (5_000, 2_501)] {
            assert!(!trim.burst_ended(peak, open), "trimmed at {open} open during the burst");
        }
        assert!(trim.burst_ended(2_501, 2_500), "no trim once the burst had halved");
        // Once: the peak is now what is left.
        assert!(!trim.burst_ended(2_500, 2_000));
        assert!(trim.burst_ended(2_000, 0), "no trim when the rest of the burst ended");
        assert!(!trim.burst_ended(0, 0));
        // A burst that came and went between two ticks.
        assert!(trim.burst_ended(3_000, 0), "no trim after a burst shorter than a tick");
    }
}
