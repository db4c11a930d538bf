//! A value each process builds for itself on first use: the pipeline's core, the
//! middleware's hand-off lane, a reader's runtime and connections. A forked child (gunicorn
//! `--preload`, uvicorn `--workers`, multiprocessing) inherits its parent's copy without the
//! threads behind it, perhaps with its locks held and with the parent's sockets: it builds
//! its own and never touches the copy. The copy is leaked, never dropped (dropping it could
//! wait for ever on a lock no thread will release, or close the parent's connections).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, MutexGuard};

use crate::pipeline::fork_generation;

struct Owned<T> {
    generation: u64,
    value: Arc<T>,
}

pub struct PerProcess<T> {
    slot: ArcSwapOption<Owned<T>>,
    starting: Mutex<()>,
}

impl<T> Default for PerProcess<T> {
    fn default() -> Self {
        PerProcess {
            slot: ArcSwapOption::empty(),
            starting: Mutex::new(()),
        }
    }
}

impl<T> PerProcess<T> {
    /// This process's value, if it was built.
    pub fn current(&self) -> Option<Arc<T>> {
        let generation = fork_generation();
        self.slot
            .load()
            .as_ref()
            .filter(|o| o.generation == generation)
            .map(|o| o.value.clone())
    }

    /// This process's value, built by `init` on first use (once: under the start lock).
    pub fn get_or_try_init<E>(
        &self,
        init: impl FnOnce() -> Result<Arc<T>, E>,
    ) -> Result<Arc<T>, E> {
        if let Some(value) = self.current() {
            return Ok(value);
        }
        let _guard = self.starting.lock();
        if let Some(value) = self.current() {
            return Ok(value);
        }
        let value = init()?;
        let owned = Owned {
            generation: fork_generation(),
            value: value.clone(),
        };
        if let Some(parents) = self.slot.swap(Some(Arc::new(owned))) {
            std::mem::forget(parents);
        }
        Ok(value)
    }

    /// [`PerProcess::get_or_try_init`] for values that cannot fail to build.
    pub fn get_or_init(&self, init: impl FnOnce() -> Arc<T>) -> Arc<T> {
        match self.get_or_try_init(|| Ok::<_, std::convert::Infallible>(init())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// The lock a build runs under: holding it, a caller changes what the next build sees
    /// (a `closed` flag) without racing one under way. Never call the getters meanwhile.
    pub fn hold_start(&self) -> MutexGuard<'_, ()> {
        self.starting.lock()
    }
}

impl<T> Drop for PerProcess<T> {
    fn drop(&mut self) {
        if let Some(owned) = self.slot.swap(None) {
            if owned.generation != fork_generation() {
                std::mem::forget(owned);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_per_process() {
        let p = PerProcess::<u32>::default();
        assert!(p.current().is_none());
        let mut builds = 0;
        assert_eq!(
            *p.get_or_init(|| {
                builds += 1;
                Arc::new(7)
            }),
            7
        );
        assert_eq!(
            *p.get_or_init(|| {
                builds += 1;
                Arc::new(8)
            }),
            7
        );
        assert_eq!(builds, 1);
        assert_eq!(p.current().as_deref(), Some(&7));
        let failed: Result<_, &str> = PerProcess::<u32>::default().get_or_try_init(|| Err("no"));
        assert_eq!(failed.err(), Some("no"));
    }
}
