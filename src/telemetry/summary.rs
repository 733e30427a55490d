//! One log line for an event that concerns many targets at once: the first occurrence is
//! logged as it happens, the others of the same window are counted and logged together with
//! a few examples when the window closes. A start-up against a thousand workers of one kind
//! then writes two lines, not a thousand. Pure; the caller logs and keeps the clock.

use std::time::Duration;
use tokio::time::Instant;

/// Examples named in a summary line.
pub const EXAMPLES: usize = 3;

/// What to log now.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The first occurrence of a window, about this target.
    First(String),
    /// Occurrences after the first in a window that closed: how many, and a few of them.
    More { count: usize, examples: Vec<String> },
}

#[derive(Debug)]
pub struct Summary {
    window: Duration,
    opened: Option<Instant>,
    more: usize,
    examples: Vec<String>,
}

impl Summary {
    pub const fn new(window: Duration) -> Self {
        Self {
            window,
            opened: None,
            more: 0,
            examples: Vec::new(),
        }
    }

    /// An occurrence about `target` at `now`: the first of a window is logged at once (after
    /// the summary of a window that closed meanwhile, if `due` was not asked in between).
    pub fn note(&mut self, target: &str, now: Instant) -> Vec<Line> {
        if let Some(opened) = self.opened
            && now < opened + self.window
        {
            self.more += 1;
            if self.examples.len() < EXAMPLES {
                self.examples.push(target.to_string());
            }
            return Vec::new();
        }
        let mut lines: Vec<Line> = self.flush_all().into_iter().collect();
        self.opened = Some(now);
        lines.push(Line::First(target.to_string()));
        lines
    }

    /// When the open window closes, if anything is pending.
    pub fn due_at(&self) -> Option<Instant> {
        self.opened
            .filter(|_| self.more > 0)
            .map(|opened| opened + self.window)
    }

    /// The summary of a window that closed by `now`, if it had more than its first.
    pub fn due(&mut self, now: Instant) -> Option<Line> {
        match self.opened {
            Some(opened) if now >= opened + self.window => self.flush_all(),
            _ => None,
        }
    }

    fn flush_all(&mut self) -> Option<Line> {
        self.opened = None;
        let count = std::mem::take(&mut self.more);
        let examples = std::mem::take(&mut self.examples);
        (count > 0).then_some(Line::More { count, examples })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_occurrences_in_a_window_are_two_lines() {
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut summary = Summary::new(window);
        assert_eq!(summary.note("t-0", t0), [Line::First("t-0".into())]);
        for i in 1..1000 {
            assert!(
                summary
                    .note(&format!("t-{i}"), t0 + Duration::from_millis(i))
                    .is_empty()
            );
        }
        assert_eq!(summary.due_at(), Some(t0 + window));
        assert_eq!(summary.due(t0 + window - Duration::from_millis(1)), None);
        assert_eq!(
            summary.due(t0 + window),
            Some(Line::More {
                count: 999,
                examples: vec!["t-1".into(), "t-2".into(), "t-3".into()],
            })
        );
        // Nothing more pending; the next occurrence opens a new window.
        assert_eq!(summary.due_at(), None);
        assert_eq!(summary.due(t0 + window * 3), None);
        assert_eq!(
            summary.note("t-x", t0 + window * 3),
            [Line::First("t-x".into())]
        );
    }

    #[test]
    fn a_summary_nobody_asked_for_comes_before_the_next_first_line() {
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut summary = Summary::new(window);
        summary.note("a", t0);
        summary.note("b", t0 + Duration::from_secs(1));
        assert_eq!(
            summary.note("c", t0 + window * 2),
            [
                Line::More {
                    count: 1,
                    examples: vec!["b".into()]
                },
                Line::First("c".into())
            ]
        );
    }

    #[test]
    fn a_lone_occurrence_is_one_line_and_nothing_is_due() {
        let t0 = Instant::now();
        let mut summary = Summary::new(Duration::from_secs(10));
        assert_eq!(summary.note("a", t0), [Line::First("a".into())]);
        assert_eq!(summary.due_at(), None);
        assert_eq!(summary.due(t0 + Duration::from_secs(60)), None);
        // After the window, a new occurrence is logged at once again.
        assert_eq!(
            summary.note("b", t0 + Duration::from_secs(60)),
            [Line::First("b".into())]
        );
    }
}
