//! Locks that outlive a panic.
//!
//! A task that panics while holding one of the daemon's mutexes (a counter,
//! the flow table, a settings cell) leaves it poisoned. Unwrapping the lock
//! would then turn that one failure into a panic in every task that touches
//! the same state, which is every later flow. The state these locks guard is
//! updated in single steps that leave it consistent, so the guard is taken
//! back as it is, as `parking_lot` locks (which have no poisoning) would.
use std::sync::{Mutex, MutexGuard, PoisonError};

pub trait Locked<T: ?Sized> {
    /// The guard, even if a panicking holder poisoned the lock.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_state() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), 2);
    }
}
