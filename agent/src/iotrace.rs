//! A recording layer under every write and flush the agent sends to a member device,
//! for the crash-consistency checker (`tests/tests/t45_crash_consistency.rs`).
//!
//! Every member write — array data from the engine, superblocks and bitmap pages from
//! the engine's writers, and the off-line metadata writes of [`crate::format::io`]
//! (create, join's slot merge, takeover's slot clear, `grow --bitmap`) — reports itself
//! here after `pwrite` returned, and every `fdatasync` reports its start and its end. A
//! checker installs an [`IoTracer`], runs a workload, and rebuilds the members as they
//! could be on disk after a crash at any point of the recorded order.
//!
//! Compiled in only with the `io-trace` cargo feature (the test crate enables it); without
//! it the hooks are empty inline functions. With it and no tracer installed, a hook is
//! one uncontended read lock.

use std::path::Path;

/// Receives the member I/O of this process, in the order it completed.
pub trait IoTracer: Send + Sync {
    /// `data` was written at byte `offset` of the device at `path` (the write returned).
    fn write(&self, path: &Path, offset: u64, data: &[u8]);
    /// An `fdatasync` of `path` starts: writes that returned before this are durable
    /// once the matching [`IoTracer::flush_end`] is reported.
    fn flush_begin(&self, path: &Path) -> u64;
    /// The `fdatasync` started as `id` returned successfully.
    fn flush_end(&self, path: &Path, id: u64);
}

#[cfg(feature = "io-trace")]
mod hooks {
    use super::IoTracer;
    use std::path::Path;
    use std::sync::{Arc, RwLock};

    static TRACER: RwLock<Option<Arc<dyn IoTracer>>> = RwLock::new(None);

    fn current() -> Option<Arc<dyn IoTracer>> {
        TRACER.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs (or with `None` removes) the process's tracer.
    pub fn install(tracer: Option<Arc<dyn IoTracer>>) {
        *TRACER.write().unwrap_or_else(|e| e.into_inner()) = tracer;
    }

    pub(crate) fn on_write(path: &Path, offset: u64, data: &[u8]) {
        if let Some(t) = current() {
            t.write(path, offset, data);
        }
    }

    pub(crate) fn on_flush_begin(path: &Path) -> Option<(Arc<dyn IoTracer>, u64)> {
        current().map(|t| {
            let id = t.flush_begin(path);
            (t, id)
        })
    }

    pub(crate) fn on_flush_end(path: &Path, token: Option<(Arc<dyn IoTracer>, u64)>) {
        if let Some((t, id)) = token {
            t.flush_end(path, id);
        }
    }
}

#[cfg(feature = "io-trace")]
pub use hooks::install;
#[cfg(feature = "io-trace")]
pub(crate) use hooks::{on_flush_begin, on_flush_end, on_write};

/// What a flush hook hands from its start to its end (nothing, without a tracer).
#[cfg(not(feature = "io-trace"))]
pub(crate) struct FlushToken;

#[cfg(not(feature = "io-trace"))]
#[inline(always)]
pub(crate) fn on_write(_path: &Path, _offset: u64, _data: &[u8]) {}

#[cfg(not(feature = "io-trace"))]
#[inline(always)]
pub(crate) fn on_flush_begin(_path: &Path) -> FlushToken {
    FlushToken
}

#[cfg(not(feature = "io-trace"))]
#[inline(always)]
pub(crate) fn on_flush_end(_path: &Path, _token: FlushToken) {}
