//! Refusals for missing ACL permissions, as Consul words them, apart from any I/O.

use super::error::{ConsulError, truncate};

/// One line for a txn refused for missing permissions: who lacks what, each permission
/// once, e.g. `token with AccessorID 'a1' lacks 'node:write' on "n", 'service:write' on "web"
/// (129 of 129 operations refused)`. `None` when no operation was refused for a permission.
/// Consul's wording is acl/errors.go `PermissionDeniedError.Error`.
/// A token that may not write the node can write nothing: one `Forbidden` that says which
/// permissions it lacks. Entries refused for permission are left out of the pass, so the
/// others are still published, and the pass then reports `Forbidden` (see
/// [`ConsulSink::denied_error`]).
pub(super) fn forbidden_txn(error: &ConsulError, node_op: Option<usize>) -> Option<String> {
    let ConsulError::TxnRejected { failed, .. } = error else {
        return None;
    };
    if failed.is_empty() || !failed.iter().all(|(_, what)| is_permission_denied(what)) {
        return None;
    }
    let node_refused = node_op.is_some_and(|n| failed.iter().any(|(i, _)| *i == n));
    node_refused.then(|| permission_summary(failed, failed.len()))?
}

pub(super) fn is_permission_denied(what: &str) -> bool {
    what.contains("Permission denied")
}

/// One line for the permission errors among `errors` (op index, text) of a txn of `ops`.
pub(super) fn permission_summary(errors: &[(usize, String)], ops: usize) -> Option<String> {
    let denied: Vec<&str> = errors
        .iter()
        .map(|(_, what)| what.as_str())
        .filter(|what| is_permission_denied(what))
        .collect();
    let first = *denied.first()?;
    let mut who = None;
    let mut missing: Vec<&str> = Vec::new();
    for what in &denied {
        let Some((subject, rest)) = what.split_once(" lacks permission ") else {
            continue;
        };
        who.get_or_insert(subject.trim_start_matches("Permission denied: "));
        // `'service:write' on "web"`, without the anonymous token's explanation.
        let permission = rest.split(". The anonymous token").next().unwrap_or(rest);
        if !missing.contains(&permission) {
            missing.push(permission);
        }
    }
    let refused = format!("{} of {ops} operations refused", denied.len());
    Some(match who {
        Some(who) => {
            let hint = if who == "anonymous token" {
                " (no token was sent)"
            } else {
                ""
            };
            format!("{who}{hint} lacks {} ({refused})", missing.join(", "))
        }
        None => format!("{} ({refused})", truncate(first)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_are_summarised_once() {
        let op = |i, what: &str| (i, what.to_string());
        let token = "Permission denied: token with AccessorID 'a1' lacks permission";
        let errors: Vec<(usize, String)> =
            std::iter::once(op(0, &format!("{token} 'node:write' on \"n\"")))
                .chain((1..128).map(|i| op(i, &format!("{token} 'service:write' on \"web\""))))
                .collect();
        assert_eq!(
            permission_summary(&errors, 128).unwrap(),
            "token with AccessorID 'a1' lacks 'node:write' on \"n\", 'service:write' on \"web\" (128 of 128 operations refused)"
        );
        let anonymous = [op(
            0,
            "Permission denied: anonymous token lacks permission 'node:write' on \"n\". The anonymous token is used implicitly when a request does not specify a token.",
        )];
        assert_eq!(
            permission_summary(&anonymous, 1).unwrap(),
            "anonymous token (no token was sent) lacks 'node:write' on \"n\" (1 of 1 operations refused)"
        );
        let other = [op(0, "Missing node registration")];
        assert_eq!(permission_summary(&other, 1), None);
        let mixed = [
            op(0, "Permission denied"),
            op(1, "Missing node registration"),
        ];
        assert_eq!(
            permission_summary(&mixed, 2).unwrap(),
            "Permission denied (1 of 2 operations refused)"
        );
    }

    #[test]
    fn only_a_refused_node_makes_a_txn_forbidden() {
        let denied = |i: usize, on: &str| {
            (
                i,
                format!(
                    "Permission denied: token with AccessorID 'a1' lacks permission 'service:write' on \"{on}\""
                ),
            )
        };
        let rejected = |failed: Vec<(usize, String)>| ConsulError::TxnRejected {
            status: 409,
            errors: String::new(),
            failed,
        };
        // The node refused: nothing can be written.
        let node = rejected(vec![denied(0, "n"), denied(1, "a")]);
        assert!(forbidden_txn(&node, Some(0)).unwrap().contains("2 of 2"));
        // Entries refused, the node allowed or absent: they are withheld, the rest is sent.
        let entries = rejected(vec![denied(1, "a"), denied(2, "b")]);
        assert_eq!(forbidden_txn(&entries, Some(0)), None);
        assert_eq!(forbidden_txn(&entries, None), None);
        // Refused for another reason: isolation decides.
        let meta = rejected(vec![(0, "Value is too long".into())]);
        assert_eq!(forbidden_txn(&meta, Some(0)), None);
    }
}
