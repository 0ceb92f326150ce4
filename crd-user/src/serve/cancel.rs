//! Cancellation: a flag the work polls (the `interrupted` every command takes) and a
//! future the service awaits, raised when a client goes away, a deadline passes or the
//! service stops. A request's token is a child of its connection's and of the
//! service's, so raising either raises it.
use std::sync::{
    Arc, Mutex, Weak,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    raised: AtomicBool,
    notify: Notify,
    children: Mutex<Vec<Weak<Inner>>>,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token raised when any of `parents` is (or already raised if one is).
    pub fn child_of(parents: &[&Cancel]) -> Self {
        let child = Cancel::new();
        for parent in parents {
            let mut children = parent.0.children.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Children of finished requests are gone: forget them as new ones come.
            children.retain(|c| c.strong_count() > 0);
            children.push(Arc::downgrade(&child.0));
            drop(children);
            if parent.is_raised() {
                child.raise();
            }
        }
        child
    }

    /// Raises the token and its children.
    pub fn raise(&self) {
        raise(&self.0);
    }

    pub fn is_raised(&self) -> bool {
        self.0.raised.load(Ordering::Acquire)
    }

    /// Returns once the token is raised.
    pub async fn raised(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

fn raise(inner: &Inner) {
    if inner.raised.swap(true, Ordering::AcqRel) {
        return;
    }
    inner.notify.notify_waiters();
    let children =
        std::mem::take(&mut *inner.children.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    for child in children.iter().filter_map(Weak::upgrade) {
        raise(&child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_a_parent_raises_its_children_and_only_them() {
        let (service, connection) = (Cancel::new(), Cancel::new());
        let request = Cancel::child_of(&[&connection, &service]);
        let other = Cancel::child_of(&[&Cancel::new(), &service]);
        connection.raise();
        assert!(request.is_raised());
        assert!(!other.is_raised() && !service.is_raised());
        service.raise();
        assert!(other.is_raised());
        // A child of a raised token is born raised.
        assert!(Cancel::child_of(&[&service]).is_raised());
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_raised() {
        let token = Cancel::new();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move { token.raised().await }
        });
        tokio::task::yield_now().await;
        token.raise();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
