//! Warning Events about refused declarations.
//!
//! The watch loop hands the current set of problems to a publisher task through a one-slot
//! channel (a newer set replaces an unread one, so it is bounded and never blocks): a slow or
//! failing API server never delays snapshots. The publisher keeps one Event per object and
//! distinct problem alive while the problem lasts: kube-apiserver deletes Events `--event-ttl`
//! (1 h by default) after their last write, so, like client-go's events broadcaster
//! (tools/events/event_broadcaster.go, `refreshTime`), it patches the Event's series well
//! before that, and creates a new Event if the old one is gone. A rejected write is retried
//! with jittered exponential backoff, not on every resolution.

use backon::BackoffBuilder;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The controller name in `reportingController`.
pub const REPORTER: &str = "workersd";
/// Events carry at most 1 kB of note (kube-apiserver's NoteLengthLimit is 1024).
const NOTE_LIMIT: usize = 1000;
/// First retry delay after a failed write; it doubles per failure, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay, jitter included (also capped by the refresh interval).
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// One Event write may take this long before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One object's current problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: &'static str,
    /// What workersd was doing when it found the problem (the Event's `action`).
    pub action: &'static str,
    pub note: String,
}

/// Current problems by key: the object uid, or uid/reason for a second problem on one object.
pub type Problems = BTreeMap<String, Problem>;

/// Cuts a note to the Event limit on a character boundary.
pub fn note(text: String) -> String {
    let mut note = text;
    if note.len() > NOTE_LIMIT {
        let mut cut = NOTE_LIMIT;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    note
}

/// `<object name>.<nanoseconds in hex>`, like client-go and kube-rs, but cut so the whole name
/// stays a DNS subdomain of at most 253 characters: events.k8s.io/v1 rejects longer names,
/// and an object name may itself be 253 characters long.
pub fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", nanos.max(0));
    let room = 253 - suffix.len();
    let mut base: String = object.chars().take(room).collect();
    // A cut may leave a label ending in '-' or '.', which a DNS subdomain forbids.
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    if base.is_empty() {
        base.push_str(REPORTER);
    }
    base + &suffix
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Published {
    name: String,
    /// Series count written last (1: the Event itself, no series yet).
    count: i32,
}

#[derive(Debug)]
struct Entry {
    problem: Problem,
    published: Option<Published>,
    due: Instant,
    /// Retry delays after failed writes; restarted by a successful write.
    retries: backon::ExponentialBackoff,
}

/// Delays in [1 s, 2 s), [2 s, 4 s), ... up to [150 s, 300 s): the jitter (up to as much
/// again) keeps Events that failed together from being retried together.
fn retry_delays() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_FIRST)
        .with_max_delay(BACKOFF_MAX / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A write to make now.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A new Event.
    Create(Box<Event>),
    /// Renew a live Event: a merge patch of its series.
    Refresh {
        namespace: String,
        name: String,
        series: EventSeries,
    },
}

/// How a write went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created {
        name: String,
    },
    Refreshed,
    /// The Event to refresh no longer exists (expired or deleted): create a new one.
    Gone,
    Failed,
}

/// Which Events to write when: pure, timed by the caller's monotonic clock.
pub struct Plan {
    entries: BTreeMap<String, Entry>,
    refresh: Duration,
}

impl Plan {
    /// `refresh`: how long a published Event is left alone; must be well below the API
    /// server's Event TTL.
    pub fn new(refresh: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            refresh,
        }
    }

    /// Takes the current problems; returns those that are new or changed (to be logged).
    /// A changed problem gets a new Event at once, so its note names the new problem.
    pub fn update<'a>(&mut self, problems: &'a Problems, now: Instant) -> Vec<&'a Problem> {
        self.entries.retain(|uid, _| problems.contains_key(uid));
        let mut fresh = Vec::new();
        for (uid, problem) in problems {
            if self.entries.get(uid).is_some_and(|e| e.problem == *problem) {
                continue;
            }
            fresh.push(problem);
            self.entries.insert(
                uid.clone(),
                Entry {
                    problem: problem.clone(),
                    published: None,
                    due: now,
                    retries: retry_delays(),
                },
            );
        }
        fresh
    }

    /// Uids with a write due at `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    /// When the next write falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.due).min()
    }

    /// The write for `uid`; `wall` is the time written into the Event.
    pub fn action(&self, uid: &str, identity: &str, wall: Timestamp) -> Option<Action> {
        let entry = self.entries.get(uid)?;
        let p = &entry.problem;
        Some(match &entry.published {
            Some(published) => Action::Refresh {
                namespace: p.namespace.clone(),
                name: published.name.clone(),
                series: EventSeries {
                    count: published.count + 1,
                    last_observed_time: MicroTime(wall),
                },
            },
            None => Action::Create(Box::new(Event {
                metadata: ObjectMeta {
                    name: Some(event_name(&p.name, wall.as_nanosecond())),
                    namespace: Some(p.namespace.clone()),
                    ..ObjectMeta::default()
                },
                event_time: Some(MicroTime(wall)),
                type_: Some("Warning".into()),
                reason: Some(p.reason.into()),
                action: Some(p.action.into()),
                note: Some(p.note.clone()),
                reporting_controller: Some(REPORTER.into()),
                reporting_instance: Some(identity.into()),
                regarding: Some(ObjectReference {
                    api_version: Some(p.api_version.into()),
                    kind: Some(p.kind.into()),
                    namespace: Some(p.namespace.clone()),
                    name: Some(p.name.clone()),
                    uid: Some(p.uid.clone()),
                    ..ObjectReference::default()
                }),
                ..Event::default()
            })),
        })
    }

    /// Records how the write for `uid` (made with `action`) went.
    pub fn done(&mut self, uid: &str, action: &Action, outcome: Outcome, now: Instant) {
        let refresh = self.refresh;
        let Some(entry) = self.entries.get_mut(uid) else {
            return; // the problem went away meanwhile
        };
        match outcome {
            Outcome::Created { name } => {
                entry.published = Some(Published { name, count: 1 });
                entry.retries = retry_delays();
                entry.due = now + refresh;
            }
            Outcome::Refreshed => {
                if let (Some(published), Action::Refresh { series, .. }) =
                    (entry.published.as_mut(), action)
                {
                    published.count = series.count;
                }
                entry.retries = retry_delays();
                entry.due = now + refresh;
            }
            Outcome::Gone => {
                entry.published = None;
                entry.due = now;
            }
            Outcome::Failed => {
                let backoff = entry
                    .retries
                    .next()
                    .unwrap_or(BACKOFF_MAX)
                    .min(BACKOFF_MAX)
                    .min(refresh);
                entry.due = now + backoff;
            }
        }
    }
}

async fn perform(client: &Client, action: &Action) -> Result<Outcome, kube::Error> {
    match action {
        Action::Create(event) => {
            let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
            let api: Api<Event> = Api::namespaced(client.clone(), namespace);
            let created = api.create(&PostParams::default(), event).await?;
            Ok(Outcome::Created {
                name: created
                    .metadata
                    .name
                    .or_else(|| event.metadata.name.clone())
                    .unwrap_or_default(),
            })
        }
        Action::Refresh {
            namespace,
            name,
            series,
        } => {
            let api: Api<Event> = Api::namespaced(client.clone(), namespace);
            let body = serde_json::json!({ "series": series });
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => Ok(Outcome::Refreshed),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(Outcome::Gone),
                Err(e) => Err(e),
            }
        }
    }
}

/// Publishes Events for the problems on `problems` until its sender is dropped.
#[tracing::instrument(name = "kubernetes_events", skip_all, fields(identity = %identity))]
pub async fn run(
    client: Client,
    identity: String,
    refresh: Duration,
    mut problems: watch::Receiver<Arc<Problems>>,
) {
    let mut plan = Plan::new(refresh);
    loop {
        let current = problems.borrow_and_update().clone();
        for p in plan.update(&current, Instant::now()) {
            tracing::warn!(namespace = %p.namespace, name = %p.name, kind = p.kind, reason = p.reason, problems = %p.note, "problem reported as a Warning Event");
        }
        for uid in plan.due(Instant::now()) {
            let Some(action) = plan.action(&uid, &identity, Timestamp::now()) else {
                continue;
            };
            let outcome = match tokio::time::timeout(WRITE_TIMEOUT, perform(&client, &action)).await
            {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => {
                    tracing::warn!(object = %uid, error = %e, "cannot publish Event; retrying with backoff");
                    Outcome::Failed
                }
                Err(_) => {
                    tracing::warn!(object = %uid, "Event write timed out; retrying with backoff");
                    Outcome::Failed
                }
            };
            plan.done(&uid, &action, outcome, Instant::now());
        }
        let wake = plan.next_due();
        tokio::select! {
            changed = problems.changed() => if changed.is_err() { return },
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(note: &str) -> Problem {
        Problem {
            api_version: "v1",
            kind: "Pod",
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "u1".into(),
            reason: "InvalidWorkerMetrics",
            action: "Validate",
            note: note.into(),
        }
    }

    fn problems(note: &str) -> Problems {
        Problems::from([("u1".to_string(), problem(note))])
    }

    #[test]
    fn event_names_stay_dns_subdomains_of_at_most_253() {
        assert_eq!(event_name("web-1", 0x1f), "web-1.1f");
        let long = format!("{}-x", "a".repeat(240));
        for object in [
            long.as_str(),
            &"b".repeat(253),
            &format!("{}.c", "d".repeat(236)),
        ] {
            let name = event_name(object, i128::from(i64::MAX));
            assert!(name.len() <= 253, "{} chars", name.len());
            let labels_ok = name.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
            assert!(labels_ok, "{name}");
        }
        // A cut that would end a label on '-' or '.' drops those characters.
        let name = event_name(&format!("{}-.-zzzz", "e".repeat(247)), 0xabc);
        assert!(name.ends_with("e.abc"), "{name}");
    }

    #[test]
    fn one_event_per_problem_refreshed_before_the_ttl_and_recreated_when_gone() {
        let refresh = Duration::from_secs(1800);
        let mut plan = Plan::new(refresh);
        let t0 = Instant::now();
        let wall = Timestamp::now();
        assert_eq!(plan.update(&problems("bad ports"), t0).len(), 1);
        assert_eq!(plan.due(t0), vec!["u1".to_string()]);
        let Some(create @ Action::Create(_)) = plan.action("u1", "wd-1", wall) else {
            panic!("a new Event first")
        };
        plan.done(
            "u1",
            &create,
            Outcome::Created {
                name: "web-1.1".into(),
            },
            t0,
        );
        // The same problem again: nothing to log, nothing due until the refresh.
        assert!(plan.update(&problems("bad ports"), t0).is_empty());
        assert!(plan.due(t0 + refresh - Duration::from_secs(1)).is_empty());
        assert_eq!(plan.next_due(), Some(t0 + refresh));
        // Before the 1 h TTL: the series is patched (count 2, then 3).
        let t1 = t0 + refresh;
        let refresh_action = plan.action("u1", "wd-1", wall).unwrap();
        let Action::Refresh { name, series, .. } = &refresh_action else {
            panic!("a refresh, not a new Event: {refresh_action:?}")
        };
        assert_eq!((name.as_str(), series.count), ("web-1.1", 2));
        plan.done("u1", &refresh_action, Outcome::Refreshed, t1);
        let Some(Action::Refresh { series, .. }) = plan.action("u1", "wd-1", wall) else {
            panic!()
        };
        assert_eq!(series.count, 3);
        // The Event expired anyway (a shorter TTL, someone deleted it): a new one at once.
        plan.done("u1", &refresh_action, Outcome::Gone, t1);
        assert_eq!(plan.due(t1), vec!["u1".to_string()]);
        assert!(matches!(
            plan.action("u1", "wd-1", wall),
            Some(Action::Create(_))
        ));
        // A different problem: a new Event naming it, even before the refresh.
        plan.done(
            "u1",
            &create,
            Outcome::Created {
                name: "web-1.2".into(),
            },
            t1,
        );
        assert_eq!(plan.update(&problems("bad service"), t1).len(), 1);
        let Some(Action::Create(event)) = plan.action("u1", "wd-1", wall) else {
            panic!()
        };
        assert_eq!(event.note.as_deref(), Some("bad service"));
        // The problem is fixed: nothing more.
        plan.update(&Problems::new(), t1);
        assert_eq!(plan.next_due(), None);
    }

    #[test]
    fn a_rejected_event_is_retried_with_backoff() {
        let mut plan = Plan::new(Duration::from_secs(1800));
        let t0 = Instant::now();
        plan.update(&problems("bad ports"), t0);
        let action = plan.action("u1", "wd-1", Timestamp::now()).unwrap();
        let mut at = t0;
        let fail = |plan: &mut Plan, at: Instant| {
            plan.done("u1", &action, Outcome::Failed, at);
            let next = plan.next_due().unwrap();
            // Re-resolving the same problem does not bring the retry forward.
            plan.update(&problems("bad ports"), at);
            assert_eq!(plan.next_due(), Some(next));
            next - at
        };
        // Doubling from 1 s, each with up to as much again of jitter, never above 5 min.
        let mut jittered = 0;
        for failure in 0..12 {
            let delay = fail(&mut plan, at);
            let floor = BACKOFF_FIRST
                .saturating_mul(1 << failure)
                .min(BACKOFF_MAX / 2);
            assert!(
                floor <= delay && delay <= (floor * 2).min(BACKOFF_MAX),
                "failure {failure}: {delay:?} not in [{floor:?}, {:?}]",
                floor * 2
            );
            jittered += usize::from(delay != floor);
            at += delay;
        }
        assert!(jittered > 0, "no delay was jittered");
        // A write that succeeds restarts the delays from 1 s.
        plan.done(
            "u1",
            &action,
            Outcome::Created {
                name: "web-1.1".into(),
            },
            at,
        );
        assert_eq!(plan.next_due(), Some(at + Duration::from_secs(1800)));
        let delay = fail(&mut plan, at);
        assert!(delay < 2 * BACKOFF_FIRST, "{delay:?}");
        // A short refresh interval caps the delay too.
        let mut plan = Plan::new(Duration::from_secs(3));
        plan.update(&problems("bad ports"), t0);
        let action = plan.action("u1", "wd-1", Timestamp::now()).unwrap();
        for _ in 0..4 {
            plan.done("u1", &action, Outcome::Failed, t0);
        }
        assert_eq!(plan.next_due(), Some(t0 + Duration::from_secs(3)));
    }
}
