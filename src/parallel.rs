//! Running one job on several threads at once.

/// Runs `work` on `n` threads, the caller's among them, and returns once
/// every one has returned. The runs share what `work` captures (a queue,
/// a counter) and each returns when nothing is left. A thread the system
/// refuses means fewer at once, never a panic: the caller's run alone
/// finishes the job.
pub(crate) fn on_threads(n: usize, work: impl Fn() + Sync) {
    if n <= 1 {
        return work();
    }
    std::thread::scope(|s| {
        for _ in 1..n {
            let _ = std::thread::Builder::new().spawn_scoped(s, &work);
        }
        work();
    });
}
