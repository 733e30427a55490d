//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder probes and writes;
//! a standby takes over once the holder stops renewing for a lease duration.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// How often a standby reads the lease, when not [`Self::retry_every`]'s default.
    pub standby_poll: Option<Duration>,
}

impl LeaseSettings {
    /// Renew well inside the lease so one slow request does not lose it.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How often a standby reads the lease. It takes over one lease duration after it last saw
    /// the lease change, so polling more often than the holder renews keeps takeover close to
    /// that (client-go's RetryPeriod, 2 s for a 15 s lease, plays this part).
    /// A role that may wait to be taken over (node-local mode's janitor, with one standby
    /// per node) polls less often: every standby's read is an API request.
    pub fn retry_every(&self) -> Duration {
        self.standby_poll.unwrap_or(self.duration / 6)
    }

    /// A leader that has not renewed for this long steps down, a third of the lease before a
    /// standby may take over, so two instances never lead at once.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it, with us as its holder.
    Create,
    /// We lead: refresh renewTime.
    Renew,
    /// The holder stopped renewing: take it over.
    Takeover,
    /// Someone else leads and its lease is live.
    Wait { holder: String },
}

/// What this instance last saw of the lease and when, on its own monotonic clock. As in
/// client-go (tools/leaderelection/leaderelection.go: `observedRecord`, `observedTime`,
/// `isLeaseValid`), another holder's lease expires `leaseDurationSeconds` after this instance
/// last saw it change; the holder's renewTime is never compared with our clock, so clock skew
/// between nodes cannot hand the lease to a second leader.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    record: Option<(Option<String>, Option<LeaseSpec>)>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes the lease as read at `now`; the clock restarts only when its resourceVersion or
    /// spec (holder, renewTime, ...) changed since the last read.
    pub fn observe(&mut self, lease: &Lease, now: Instant) {
        let record = (lease.metadata.resource_version.clone(), lease.spec.clone());
        if self.record.as_ref() != Some(&record) {
            self.record = Some(record);
            self.at = Some(now);
        }
    }

    /// The holder of the lease last observed.
    pub fn holder(&self) -> Option<&str> {
        self.record
            .as_ref()
            .and_then(|(_, spec)| spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
    }

    /// Whether the observed lease is still valid at `now`. A missing leaseDurationSeconds
    /// counts as 0, as in client-go's LeaseSpecToLeaderElectionRecord.
    fn valid(&self, now: Instant) -> bool {
        let Some(at) = self.at else { return false };
        let seconds = self
            .record
            .as_ref()
            .and_then(|(_, spec)| spec.as_ref())
            .and_then(|s| s.lease_duration_seconds)
            .unwrap_or(0)
            .max(0);
        at + Duration::from_secs(seconds as u64) > now
    }
}

/// What to do with the lease as it is now; `observed` must already have seen `lease`.
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    observed: &Observed,
    now: Instant,
) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Decision::Takeover
        } else {
            Decision::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() || !observed.valid(now) {
        return Decision::Takeover;
    }
    Decision::Wait { holder }
}

fn leader_spec(
    settings: &LeaseSettings,
    previous: Option<&LeaseSpec>,
    now: Timestamp,
    takeover: bool,
) -> LeaseSpec {
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration.as_secs().max(1) as i32),
        acquire_time: if takeover || previous.is_none() {
            Some(MicroTime(now))
        } else {
            previous.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if takeover {
            transitions + 1
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to become or stay leader. `Ok(true)`: we lead now. Conflicts (a
/// concurrent writer) are a plain `Ok(false)`.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    if let Some(lease) = &current {
        observed.observe(lease, Instant::now());
    }
    // Wall-clock time only for what is written (renewTime, acquireTime); decisions use the
    // monotonic clock.
    let now = Timestamp::now();
    let result = match decide(
        current.as_ref(),
        &settings.identity,
        observed,
        Instant::now(),
    ) {
        Decision::Wait { .. } => return Ok(false),
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(leader_spec(settings, None, now, false)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        decision @ (Decision::Renew | Decision::Takeover) => {
            let mut lease = current.expect("decided on an existing lease");
            let spec = leader_spec(
                settings,
                lease.spec.as_ref(),
                now,
                decision == Decision::Takeover,
            );
            lease.spec = Some(spec);
            // metadata.resourceVersion is kept: a concurrent update fails with 409.
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this instance leads; returns when the successful attempt started,
/// which is no later than the renewTime recorded in the lease.
#[tracing::instrument(name = "lease", skip_all, fields(namespace = %settings.namespace, lease = %settings.name, identity = %settings.identity))]
pub async fn acquire(api: &Api<Lease>, settings: &LeaseSettings) -> Instant {
    let mut observed = Observed::default();
    let mut logged_holder = None;
    loop {
        let attempt = Instant::now();
        match tokio::time::timeout(
            settings.renew_deadline(),
            try_acquire_or_renew(api, settings, &mut observed),
        )
        .await
        {
            Ok(Ok(true)) => {
                tracing::info!("became leader");
                return attempt;
            }
            Ok(Ok(false)) => {
                let holder = observed.holder().map(str::to_string);
                if holder != logged_holder {
                    tracing::info!(holder = ?holder, "standing by; another instance leads");
                    logged_holder = holder;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease request failed; retrying")
            }
            Err(_) => tracing::warn!("lease request timed out; retrying"),
        }
        tokio::time::sleep(settings.retry_every()).await;
    }
}

/// Renews the lease; returns when leadership must be given up: another holder took it, or no
/// renewal succeeded within the renew deadline. Every attempt is bounded by what is left of
/// that deadline, so a hung request cannot keep a leader writing past its lease (the standby
/// takes over only after the full lease duration).
#[tracing::instrument(name = "lease", skip_all, fields(namespace = %settings.namespace, lease = %settings.name, identity = %settings.identity))]
pub async fn renew_while_leading(api: &Api<Lease>, settings: &LeaseSettings, acquired: Instant) {
    let mut observed = Observed::default();
    // The start of the last successful attempt: never later than the renewTime it wrote.
    let mut last_renewed = acquired;
    // Renewals are timed from the last successful attempt's start, not from when it finished:
    // a slow acquisition or renewal must not eat the time left before the renew deadline.
    let mut next = acquired + settings.renew_every();
    loop {
        tokio::time::sleep_until(next).await;
        let attempt = Instant::now();
        let left = settings
            .renew_deadline()
            .saturating_sub(attempt - last_renewed);
        match tokio::time::timeout(left, try_acquire_or_renew(api, settings, &mut observed)).await {
            Ok(Ok(true)) => {
                last_renewed = attempt;
                next = attempt + settings.renew_every();
            }
            Ok(Ok(false)) => {
                tracing::error!("lost the lease to another instance");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease renewal failed")
            }
            Err(_) => tracing::warn!("lease renewal timed out"),
        }
        if last_renewed.elapsed() >= settings.renew_deadline() {
            tracing::error!("could not renew the lease before its renew deadline");
            return;
        }
        if next <= Instant::now() {
            // Failed: retry soon, while there is time left before the deadline.
            next = Instant::now() + settings.renew_every() / 4;
        }
    }
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..LeaseSpec::default()
            }),
        }
    }

    fn observed(lease: &Lease, at: Instant) -> Observed {
        let mut observed = Observed::default();
        observed.observe(lease, at);
        observed
    }

    #[test]
    fn timings_keep_one_leader_inside_the_lease() {
        let settings = LeaseSettings {
            namespace: "ops".into(),
            name: "workersd".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            standby_poll: None,
        };
        assert_eq!(settings.renew_every(), Duration::from_secs(5));
        assert_eq!(settings.retry_every(), Duration::from_millis(2500));
        assert_eq!(settings.renew_deadline(), Duration::from_secs(10));
        // A standby polls more often than the holder renews, and the holder gives up a third
        // of the lease before anyone may take over.
        assert!(settings.retry_every() < settings.renew_every());
        assert!(settings.renew_every() < settings.renew_deadline());
        assert!(settings.renew_deadline() < settings.duration);
        let slow = LeaseSettings {
            standby_poll: Some(Duration::from_secs(60)),
            ..settings
        };
        assert_eq!(slow.retry_every(), Duration::from_secs(60));
        assert_eq!(
            slow.renew_every(),
            Duration::from_secs(5),
            "the holder renews as often"
        );
    }

    #[test]
    fn the_holder_is_the_one_last_observed() {
        let t0 = Instant::now();
        assert_eq!(Observed::default().holder(), None);
        let mut seen = observed(&lease("other", 0, 15), t0);
        assert_eq!(seen.holder(), Some("other"));
        seen.observe(&lease("me", 0, 15), t0);
        assert_eq!(seen.holder(), Some("me"));
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let none = Observed::default();
        assert_eq!(decide(None, "me", &none, t0), Decision::Create);
        let mine = lease("me", 100, 15);
        assert_eq!(
            decide(Some(&mine), "me", &observed(&mine, t0), t0),
            Decision::Renew
        );
        let other = lease("other", 5, 15);
        assert_eq!(
            decide(Some(&other), "me", &observed(&other, t0), t0),
            Decision::Wait {
                holder: "other".into()
            }
        );
        let released = lease("", 1, 15);
        assert_eq!(
            decide(Some(&released), "me", &observed(&released, t0), t0),
            Decision::Takeover
        );
        let empty = Lease::default();
        assert_eq!(
            decide(Some(&empty), "me", &observed(&empty, t0), t0),
            Decision::Takeover
        );
        let mut no_duration = lease("other", 0, 15);
        no_duration.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert_eq!(
            decide(Some(&no_duration), "me", &observed(&no_duration, t0), t0),
            Decision::Takeover,
            "no leaseDurationSeconds is a zero-length lease, as in client-go"
        );
    }

    /// The holder's renewTime says nothing about expiry: only how long this instance has seen
    /// the lease unchanged. A holder clock 10 s ahead or 10 s behind changes nothing.
    #[test]
    fn expiry_follows_our_observation_not_the_holders_clock() {
        for skew in [-10, 10] {
            // renewTime 10 s in the future (skew -10: "renewed -10 s ago") or 10 s in the past.
            let held = lease("other", skew, 15);
            let t0 = Instant::now();
            let mut seen = observed(&held, t0);
            let at = |secs: u64| t0 + Duration::from_secs(secs);
            let wait = Decision::Wait {
                holder: "other".into(),
            };
            assert_eq!(decide(Some(&held), "me", &seen, t0), wait, "skew {skew}");
            // Unchanged for 14 s: still valid whatever its renewTime says.
            seen.observe(&held, at(14));
            assert_eq!(
                decide(Some(&held), "me", &seen, at(14)),
                wait,
                "skew {skew}"
            );
            // Unchanged for a whole lease duration: expired.
            seen.observe(&held, at(15));
            assert_eq!(
                decide(Some(&held), "me", &seen, at(15)),
                Decision::Takeover,
                "skew {skew}"
            );
            // A renewal (new renewTime, even an older one) restarts the clock.
            let mut renewed = held.clone();
            renewed.spec.as_mut().unwrap().renew_time = Some(MicroTime(
                held.spec.as_ref().unwrap().renew_time.as_ref().unwrap().0
                    - SignedDuration::from_secs(1),
            ));
            seen.observe(&renewed, at(20));
            assert_eq!(decide(Some(&renewed), "me", &seen, at(34)), wait);
            assert_eq!(
                decide(Some(&renewed), "me", &seen, at(35)),
                Decision::Takeover
            );
            // So does a new resourceVersion.
            let mut rewritten = renewed.clone();
            rewritten.metadata.resource_version = Some("9".into());
            seen.observe(&rewritten, at(35));
            assert_eq!(decide(Some(&rewritten), "me", &seen, at(49)), wait);
        }
    }

    #[test]
    fn takeover_counts_transitions_and_renewal_keeps_acquire_time() {
        let settings = LeaseSettings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            standby_poll: None,
        };
        let now = Timestamp::now();
        let previous = lease("other", 30, 15).spec.unwrap();
        let taken = leader_spec(&settings, Some(&previous), now, true);
        assert_eq!(
            taken.acquire_time,
            Some(MicroTime(now)),
            "a takeover acquires anew"
        );
        assert_eq!(taken.lease_transitions, Some(1));
        let created = leader_spec(&settings, None, now, false);
        assert_eq!(created.acquire_time, Some(MicroTime(now)));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        let later = now + SignedDuration::from_secs(5);
        let renewed = leader_spec(&settings, Some(&taken), later, false);
        assert_eq!(renewed.acquire_time, taken.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.lease_transitions, Some(1));
    }
}
