//! Allocation counts shared by every worker's [`super::Server`], so the per-user and total caps
//! (RFC 8656 §7.2 step 8: 486, 508) hold for the whole relay, not per worker.
//!
//! This is the core's one shared effect. The core sees only [`AllocationQuota`], so how the
//! counts are shared (the mutex of [`QuotaLedger`], or anything else) is the caller's choice.

use std::{
    collections::HashMap,
    fmt,
    sync::{Mutex, MutexGuard},
};

/// Why an allocation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// The user has its maximum number of allocations (486).
    User,
    /// The relay has its maximum number of allocations (508).
    Total,
}

/// Relay-wide allocation counts as the core uses them: take one before an allocation exists,
/// give it back when the allocation is gone. `&self` because the counts are shared between
/// servers; `Send + Sync` because each server runs on a worker thread of its own.
pub trait AllocationQuota: fmt::Debug + Send + Sync {
    /// Counts one more allocation for `user` unless a cap is reached.
    fn try_acquire(
        &self,
        user: &str,
        per_user_cap: usize,
        total_cap: usize,
    ) -> Result<(), QuotaError>;

    /// Gives back one allocation of `user`.
    fn release(&self, user: &str);

    /// Allocations held relay-wide (for the load threshold that sends clients to alternates).
    fn total(&self) -> usize;
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<String, usize>,
}

/// Live allocation counts behind one mutex (held for a map update only); cheap to share
/// behind an `Arc`.
#[derive(Debug, Default)]
pub struct QuotaLedger {
    counts: Mutex<Counts>,
}

impl QuotaLedger {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // A panic elsewhere cannot leave the counts half-updated (each update is one step).
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live allocations of `user`.
    pub fn of_user(&self, user: &str) -> usize {
        self.lock().per_user.get(user).copied().unwrap_or(0)
    }

    /// Live allocations in total.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

impl AllocationQuota for QuotaLedger {
    fn total(&self) -> usize {
        QuotaLedger::total(self)
    }

    fn try_acquire(
        &self,
        user: &str,
        per_user_cap: usize,
        total_cap: usize,
    ) -> Result<(), QuotaError> {
        let mut counts = self.lock();
        let mine = counts.per_user.get(user).copied().unwrap_or(0);
        if mine >= per_user_cap {
            return Err(QuotaError::User);
        }
        if counts.total >= total_cap {
            return Err(QuotaError::Total);
        }
        counts.total += 1;
        *counts.per_user.entry(user.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    fn release(&self, user: &str) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_user.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let ledger = QuotaLedger::default();
        assert_eq!(ledger.try_acquire("a", 2, 3), Ok(()));
        assert_eq!(ledger.try_acquire("a", 2, 3), Ok(()));
        assert_eq!(ledger.try_acquire("a", 2, 3), Err(QuotaError::User));
        assert_eq!(ledger.try_acquire("b", 2, 3), Ok(()));
        assert_eq!(ledger.try_acquire("c", 2, 3), Err(QuotaError::Total));
        ledger.release("a");
        assert_eq!(ledger.of_user("a"), 1);
        assert_eq!(ledger.try_acquire("c", 2, 3), Ok(()));
        assert_eq!(ledger.total(), 3);
        ledger.release("nobody");
        ledger.release("c");
        ledger.release("b");
        ledger.release("a");
        assert_eq!((ledger.total(), ledger.of_user("a")), (0, 0));
    }
}
