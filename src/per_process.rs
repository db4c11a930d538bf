//! A value each process builds for itself on first use: the pipeline's core, the
//! middleware's hand-off lane, a reader's runtime and connections. A forked child (gunicorn
//! `--preload`, uvicorn `--workers`, multiprocessing) inherits its parent's copy without the
//! threads behind it, perhaps with its locks held and with the parent's sockets: it builds
//! its own and never touches the copy. The copy is leaked, never dropped (dropping it could
//! wait for ever on a lock no thread will release, or close the parent's connections).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::pipeline::fork_generation;

struct Owned<T> {
    generation: u64,
    value: Arc<T>,
}

/// The value lives in a box that is set once per process and freed only when the
/// `PerProcess` is dropped (a parent's box, replaced in a child, is leaked): a reader gets a
/// plain reference, with no reference count to change. The middleware reads two of these
/// per request on the event loop's thread.
pub struct PerProcess<T> {
    slot: AtomicPtr<Owned<T>>,
    starting: Mutex<()>,
    /// Shared across threads as an `Arc<T>` is.
    _value: PhantomData<Arc<T>>,
}

impl<T> Default for PerProcess<T> {
    fn default() -> Self {
        PerProcess {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            starting: Mutex::new(()),
            _value: PhantomData,
        }
    }
}

impl<T> PerProcess<T> {
    /// This process's value, if it was built.
    pub fn current(&self) -> Option<Arc<T>> {
        self.current_ref().cloned()
    }

    /// [`PerProcess::current`], borrowed.
    pub fn current_ref(&self) -> Option<&Arc<T>> {
        let generation = fork_generation();
        // SAFETY: a non-null slot holds a box made by `get_or_try_init_ref` and published
        // with Release after it was filled. It is freed only by `drop` (no borrow of `self`
        // outlives that) and replaced only in a forked child by the child's own (the
        // replaced one is leaked), so it lives as long as this borrow of `self`.
        let owned = unsafe { self.slot.load(Ordering::Acquire).as_ref()? };
        (owned.generation == generation).then_some(&owned.value)
    }

    /// This process's value, built by `init` on first use (once: under the start lock).
    pub fn get_or_try_init<E>(
        &self,
        init: impl FnOnce() -> Result<Arc<T>, E>,
    ) -> Result<Arc<T>, E> {
        self.get_or_try_init_ref(init).cloned()
    }

    /// [`PerProcess::get_or_try_init`], borrowed.
    pub fn get_or_try_init_ref<E>(
        &self,
        init: impl FnOnce() -> Result<Arc<T>, E>,
    ) -> Result<&Arc<T>, E> {
        if let Some(value) = self.current_ref() {
            return Ok(value);
        }
        let _guard = self.starting.lock();
        if let Some(value) = self.current_ref() {
            return Ok(value);
        }
        let owned = Box::into_raw(Box::new(Owned {
            generation: fork_generation(),
            value: init()?,
        }));
        // A parent's box is left as it is (leaked): see the module's documentation.
        self.slot.swap(owned, Ordering::AcqRel);
        // SAFETY: just published; it lives as `current_ref` says.
        Ok(unsafe { &(*owned).value })
    }

    /// [`PerProcess::get_or_try_init`] for values that cannot fail to build.
    pub fn get_or_init(&self, init: impl FnOnce() -> Arc<T>) -> Arc<T> {
        self.get_or_init_ref(init).clone()
    }

    /// [`PerProcess::get_or_init`], borrowed.
    pub fn get_or_init_ref(&self, init: impl FnOnce() -> Arc<T>) -> &Arc<T> {
        match self.get_or_try_init_ref(|| Ok::<_, std::convert::Infallible>(init())) {
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
        let owned = std::mem::replace(self.slot.get_mut(), std::ptr::null_mut());
        if owned.is_null() {
            return;
        }
        // SAFETY: the slot's box, no longer reachable (`&mut self`).
        let owned = unsafe { Box::from_raw(owned) };
        if owned.generation != fork_generation() {
            std::mem::forget(owned);
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
