//! The names of the cluster's Node objects, for the janitor of node-local mode: the workers
//! of a node whose Node object is deleted are gone with it.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::watch;

/// Node names; `None` until the first complete list (an empty set then means no Node at all).
pub type NodeNames = Option<Arc<BTreeSet<String>>>;

/// Folds watch events into the set of names. Only a completed list replaces it: a list cut
/// short by an error would otherwise look like deleted nodes.
#[derive(Debug, Default)]
pub struct NodeNameSet {
    listed: Option<BTreeSet<String>>,
    listing: BTreeSet<String>,
}

impl NodeNameSet {
    /// Applies one event; true when the published set changed.
    pub fn apply(&mut self, event: Event<String>) -> bool {
        match event {
            Event::Init => {
                self.listing.clear();
                false
            }
            Event::InitApply(name) => {
                self.listing.insert(name);
                false
            }
            Event::InitDone => {
                let listed = std::mem::take(&mut self.listing);
                let changed = self.listed.as_ref() != Some(&listed);
                self.listed = Some(listed);
                changed
            }
            Event::Apply(name) => self.listed.as_mut().is_some_and(|n| n.insert(name)),
            Event::Delete(name) => self.listed.as_mut().is_some_and(|n| n.remove(&name)),
        }
    }

    pub fn names(&self) -> NodeNames {
        self.listed.clone().map(Arc::new)
    }
}

/// Only the name of each Node is kept: Node objects are large (images, conditions).
fn named(event: Event<Node>) -> Event<String> {
    let name = |node: Node| node.metadata.name.unwrap_or_default();
    match event {
        Event::Init => Event::Init,
        Event::InitApply(node) => Event::InitApply(name(node)),
        Event::InitDone => Event::InitDone,
        Event::Apply(node) => Event::Apply(name(node)),
        Event::Delete(node) => Event::Delete(name(node)),
    }
}

/// Watches Nodes until every receiver is gone. Needs nodes list and watch, which only
/// node-local mode's RBAC grants.
pub fn watch_names(client: Client) -> watch::Receiver<NodeNames> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map(|r| r.map(named));
        futures::pin_mut!(events);
        let mut names = NodeNameSet::default();
        loop {
            tokio::select! {
                () = tx.closed() => return,
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        if names.apply(event) {
                            tx.send_replace(names.names());
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "watching Nodes failed; retrying"),
                    None => return,
                },
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &NodeNameSet) -> Option<Vec<String>> {
        set.names().map(|n| n.iter().cloned().collect())
    }

    #[test]
    fn nothing_is_known_until_a_list_completes() {
        let mut set = NodeNameSet::default();
        assert!(!set.apply(Event::Init));
        assert!(!set.apply(Event::InitApply("a".into())));
        assert!(!set.apply(Event::Apply("b".into())));
        assert_eq!(names(&set), None);
        assert!(set.apply(Event::InitDone));
        assert_eq!(names(&set), Some(vec!["a".into()]));
    }

    #[test]
    fn a_relist_replaces_the_set_only_once_complete() {
        let mut set = NodeNameSet::default();
        for event in [Event::Init, Event::InitApply("a".into()), Event::InitDone] {
            set.apply(event);
        }
        assert!(set.apply(Event::Apply("b".into())));
        assert!(!set.apply(Event::Apply("b".into())));
        assert!(set.apply(Event::Delete("a".into())));
        assert_eq!(names(&set), Some(vec!["b".into()]));
        // A re-list in progress leaves the published set alone...
        set.apply(Event::Init);
        set.apply(Event::InitApply("c".into()));
        assert_eq!(names(&set), Some(vec!["b".into()]));
        // ...and replaces it when done: b was deleted while the watch was down.
        assert!(set.apply(Event::InitDone));
        assert_eq!(names(&set), Some(vec!["c".into()]));
    }
}
