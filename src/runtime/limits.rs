//! Process resources: file descriptors and heap.
//!
//! File descriptors: every probe in flight holds a socket, so `--probe-concurrency` needs that
//! many descriptors plus room for Consul, Kubernetes and the HTTP endpoints. Like Go's runtime,
//! workersd raises its soft limit to the hard one at start; when even the hard limit is too
//! low it refuses to start, because probes failing with EMFILE would read as dead workers.
//! Held worker connections (`--liveness hold`) use only what is left, one per live worker;
//! workers beyond that are reconnected each sweep instead.

/// Descriptors kept for everything but probes (Kubernetes watches, Consul, HTTP servers).
pub const HEADROOM: u64 = 256;

/// The kernel refuses soft limits above `fs.nr_open` (1,048,576 by default), even when the
/// hard limit is unlimited.
const MOST_WANTED: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "--probe-concurrency {concurrency} needs at least {needed} file descriptors \
         ({concurrency} probe sockets + {HEADROOM}), but the limit is {} (hard {}): lower \
         --probe-concurrency or raise the limit (ulimit -n, systemd LimitNOFILE, the container \
         runtime's nofile)",
        limit.soft,
        limit.hard
    )]
    TooLow {
        concurrency: usize,
        needed: u64,
        limit: FdLimit,
    },
    #[error("cannot read the file-descriptor limit")]
    Read(#[source] std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Descriptors needed for `concurrency` probes in flight.
pub fn required(concurrency: usize) -> u64 {
    concurrency as u64 + HEADROOM
}

/// Descriptors left for held worker connections: never the ones probes and the rest need.
pub fn hold_capacity(limit: FdLimit, concurrency: usize) -> usize {
    let left = limit.soft.saturating_sub(required(concurrency));
    usize::try_from(left).unwrap_or(usize::MAX)
}

/// The soft limit worth asking for: the hard limit, capped where the kernel would refuse.
pub fn target_soft(limit: FdLimit) -> u64 {
    limit.hard.min(MOST_WANTED).max(limit.soft)
}

/// Whether `limit` fits `concurrency`, with an error naming the flag and the fix.
pub fn check(limit: FdLimit, concurrency: usize) -> Result<(), LimitError> {
    let needed = required(concurrency);
    if limit.soft >= needed {
        return Ok(());
    }
    Err(LimitError::TooLow {
        concurrency,
        needed,
        limit,
    })
}

pub fn current() -> Result<FdLimit, LimitError> {
    let mut raw = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut raw) } != 0 {
        return Err(LimitError::Read(std::io::Error::last_os_error()));
    }
    Ok(FdLimit {
        soft: raw.rlim_cur,
        hard: raw.rlim_max,
    })
}

/// File descriptors open now (the entries of /proc/self/fd, less the one reading it).
pub fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(entries.saturating_sub(1))
}

/// Raises the soft limit as far as allowed, then checks it fits `concurrency`.
pub fn raise_for(concurrency: usize) -> Result<FdLimit, LimitError> {
    let before = current()?;
    let wanted = target_soft(before);
    if wanted > before.soft {
        let raw = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: before.hard,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer. Failure leaves the old
        // limit, which `check` then judges.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw) };
    }
    let after = current()?;
    check(after, concurrency)?;
    Ok(after)
}

/// Hands freed heap pages back to the kernel. glibc keeps freed memory in its arenas, so
/// the transient peak of a large Consul read (every decoded entry, every resync) otherwise
/// stays in RSS for good (BENCHMARKS.md, kube-memory). Costs a few milliseconds per call.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_the_hard_limit_capped_where_the_kernel_refuses() {
        let limit = |soft, hard| FdLimit { soft, hard };
        assert_eq!(target_soft(limit(1024, 524_288)), 524_288);
        assert_eq!(target_soft(limit(1024, libc::RLIM_INFINITY)), 1 << 20);
        assert_eq!(target_soft(limit(4096, 4096)), 4096);
        // Never lowers a soft limit that is already higher than the cap.
        assert_eq!(target_soft(limit(2 << 20, libc::RLIM_INFINITY)), 2 << 20);
    }

    #[test]
    fn refuses_a_concurrency_the_limit_cannot_hold() {
        let tight = FdLimit {
            soft: 1024,
            hard: 1024,
        };
        assert!(check(tight, 512).is_ok());
        assert!(check(tight, 768).is_ok());
        let error = check(tight, 769).unwrap_err().to_string();
        assert!(error.contains("--probe-concurrency 769"), "{error}");
        assert!(error.contains("1025 file descriptors"), "{error}");
        assert!(error.contains("the limit is 1024 (hard 1024)"), "{error}");
    }

    #[test]
    fn holds_get_only_the_descriptors_probes_do_not_need() {
        let limit = |soft| FdLimit { soft, hard: soft };
        assert_eq!(hold_capacity(limit(1 << 20), 512), (1 << 20) - 512 - 256);
        assert_eq!(hold_capacity(limit(1024), 768), 0);
        assert_eq!(hold_capacity(limit(1024), 900), 0);
    }

    #[test]
    fn raising_brings_a_lowered_soft_limit_up_to_the_target() {
        let before = current().unwrap();
        // One descriptor below (or below the cap): harmless to tests running beside this
        // one, and always below the hard limit, so there is room to raise.
        let lowered = FdLimit {
            soft: (before.soft - 1).min(MOST_WANTED - 1),
            hard: before.hard,
        };
        let raw = libc::rlimit {
            rlim_cur: lowered.soft,
            rlim_max: lowered.hard,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw) }, 0);
        assert_eq!(current().unwrap(), lowered);
        let after = raise_for(1).unwrap();
        assert_eq!(after.soft, target_soft(lowered));
        assert!(
            after.soft > lowered.soft,
            "{after:?} not raised from {lowered:?}"
        );
        assert_eq!(after.hard, before.hard);
        assert_eq!(current().unwrap(), after);
    }
}
