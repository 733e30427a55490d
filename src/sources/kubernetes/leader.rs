//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder probes and writes;
//! a standby takes over once the holder stops renewing for a lease duration.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaseSettings {
    /// Renew well inside the lease so one slow request does not lose it.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// A leader that has not renewed for this long steps down, a third of the lease before a
    /// standby may take over, so two instances never lead at once.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it, holding it.
    Create,
    /// We hold it: refresh renewTime.
    Renew,
    /// The holder stopped renewing: take it over.
    Takeover,
    /// Someone else holds a live lease.
    Wait { holder: String },
}

/// What to do with the lease as it is now.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
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
    if holder.is_empty() {
        return Decision::Takeover;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match &spec.renew_time {
        Some(MicroTime(renewed)) if renewed.saturating_add(duration).unwrap_or(*renewed) > now => {
            Decision::Wait { holder }
        }
        _ => Decision::Takeover,
    }
}

fn held_spec(
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

/// One attempt to become or stay leader. `Ok(true)`: we hold the lease now. Conflicts (a
/// concurrent writer) are a plain `Ok(false)`.
pub async fn try_hold(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    let now = Timestamp::now();
    let result = match decide(current.as_ref(), &settings.identity, now) {
        Decision::Wait { .. } => return Ok(false),
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(held_spec(settings, None, now, false)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        decision @ (Decision::Renew | Decision::Takeover) => {
            let mut lease = current.expect("decided on an existing lease");
            let spec = held_spec(
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

/// Waits until this instance holds the lease; returns when the successful attempt started,
/// which is no later than the renewTime recorded in the lease.
pub async fn acquire(api: &Api<Lease>, settings: &LeaseSettings) -> tokio::time::Instant {
    let mut logged_holder = None;
    loop {
        let attempt = tokio::time::Instant::now();
        match tokio::time::timeout(settings.renew_deadline(), try_hold(api, settings)).await {
            Ok(Ok(true)) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return attempt;
            }
            Ok(Ok(false)) => {
                if let Ok(Ok(Some(lease))) =
                    tokio::time::timeout(settings.renew_every(), api.get_opt(&settings.name)).await
                {
                    let holder = lease.spec.and_then(|s| s.holder_identity);
                    if holder != logged_holder {
                        tracing::info!(lease = %settings.name, holder = ?holder, "standing by; another instance leads");
                        logged_holder = holder;
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %settings.name, error = %e, "lease request failed; retrying")
            }
            Err(_) => tracing::warn!(lease = %settings.name, "lease request timed out; retrying"),
        }
        tokio::time::sleep(settings.renew_every()).await;
    }
}

/// Renews the lease; returns when leadership must be given up: another holder took it, or no
/// renewal succeeded within the renew deadline. Every attempt is bounded by what is left of
/// that deadline, so a hung request cannot keep a leader writing past its lease (the standby
/// takes over only after the full lease duration).
pub async fn hold(api: &Api<Lease>, settings: &LeaseSettings, acquired: tokio::time::Instant) {
    // The start of the last successful attempt: never later than the renewTime it wrote.
    let mut last_renewed = acquired;
    loop {
        tokio::time::sleep(settings.renew_every()).await;
        let attempt = tokio::time::Instant::now();
        let left = settings
            .renew_deadline()
            .saturating_sub(attempt - last_renewed);
        match tokio::time::timeout(left, try_hold(api, settings)).await {
            Ok(Ok(true)) => last_renewed = attempt,
            Ok(Ok(false)) => {
                tracing::error!(lease = %settings.name, "lost the lease to another instance");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %settings.name, error = %e, "lease renewal failed")
            }
            Err(_) => tracing::warn!(lease = %settings.name, "lease renewal timed out"),
        }
        if last_renewed.elapsed() >= settings.renew_deadline() {
            tracing::error!(lease = %settings.name, "could not renew the lease before its renew deadline");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn decisions() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "me", now), Decision::Create);
        assert_eq!(
            decide(Some(&lease("me", 100, 15)), "me", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease("other", 5, 15)), "me", now),
            Decision::Wait {
                holder: "other".into()
            }
        );
        assert_eq!(
            decide(Some(&lease("other", 16, 15)), "me", now),
            Decision::Takeover
        );
        assert_eq!(
            decide(Some(&lease("", 1, 15)), "me", now),
            Decision::Takeover
        );
        assert_eq!(
            decide(Some(&Lease::default()), "me", now),
            Decision::Takeover
        );
    }

    #[test]
    fn takeover_counts_transitions_and_renewal_keeps_acquire_time() {
        let settings = LeaseSettings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
        };
        let now = Timestamp::now();
        let previous = lease("other", 30, 15).spec.unwrap();
        let taken = held_spec(&settings, Some(&previous), now, true);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        let later = now + SignedDuration::from_secs(5);
        let renewed = held_spec(&settings, Some(&taken), later, false);
        assert_eq!(renewed.acquire_time, taken.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.lease_transitions, Some(1));
    }
}
