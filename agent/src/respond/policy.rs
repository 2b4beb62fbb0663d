//! What to do about a resolved session: pure, clock passed in, unit-tested.
//!
//! The vocabulary (metric labels, audit fields) is fixed here:
//! - actions: `logout_device` (first offence), `lock_user` (repeat, or `vigie respond --lock`),
//!   `none` (nothing was chosen);
//! - results: `acted`, `would_act` (dry-run), `failed` (the admin API never agreed),
//!   `refused_cap` (over `max_actions_per_hour`), `refused_policy` (flagged, but not for a
//!   reason the policy acts on), `skipped_allowlist`, `skipped_done` (that device or user was
//!   already acted on: never twice), `unresolved` (who is behind the label is unknown:
//!   nothing is done).

use std::collections::{HashMap, HashSet, VecDeque};

use super::config::RespondSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    LogoutDevice,
    LockUser,
    None,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::LogoutDevice, Action::LockUser, Action::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::LogoutDevice => "logout_device",
            Action::LockUser => "lock_user",
            Action::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Acted,
    WouldAct,
    Failed,
    RefusedCap,
    RefusedPolicy,
    SkippedAllowlist,
    SkippedDone,
    Unresolved,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Acted,
        Outcome::WouldAct,
        Outcome::Failed,
        Outcome::RefusedCap,
        Outcome::RefusedPolicy,
        Outcome::SkippedAllowlist,
        Outcome::SkippedDone,
        Outcome::Unresolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acted => "acted",
            Outcome::WouldAct => "would_act",
            Outcome::Failed => "failed",
            Outcome::RefusedCap => "refused_cap",
            Outcome::RefusedPolicy => "refused_policy",
            Outcome::SkippedAllowlist => "skipped_allowlist",
            Outcome::SkippedDone => "skipped_done",
            Outcome::Unresolved => "unresolved",
        }
    }
}

/// Who a flagged label turned out to be (`whoami`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub user: String,
    pub device: Option<String>,
}

/// Why the policy is asked: the detector, or an operator's `vigie respond [--lock]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Automatic,
    Manual { lock: bool },
}

/// The policy's answer: act (then report it with [`Policy::commit`]) or not, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Act(Action),
    Skip(Action, Outcome),
}

/// Whether a detector's reasons satisfy the configured list (empty: any reason will do).
pub fn reasons_match(wanted: &[String], reasons: &[(&str, f64)]) -> bool {
    wanted.is_empty() || reasons.iter().any(|(r, v)| *v > 0.0 && wanted.iter().any(|w| w == r))
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else { return pattern == text };
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The decisions' memory: what was acted on, when, and how many in the last hour.
pub struct Policy {
    allow_users: Vec<String>,
    max_per_hour: usize,
    lock_on_repeat: bool,
    repeat_window_s: f64,
    devices_done: HashSet<(String, String)>,
    users_locked: HashSet<String>,
    /// User -> times of its device logouts (would-be in dry-run), pruned to the window.
    offences: HashMap<String, Vec<f64>>,
    /// Times of the actions within the last hour.
    recent: VecDeque<f64>,
}

const HOUR_S: f64 = 3600.0;
/// Users and devices remembered; beyond, the oldest knowledge goes first (a repeat may then
/// be treated as a first offence, never the other way round).
const MAX_REMEMBERED: usize = 100_000;

impl Policy {
    pub fn new(s: &RespondSettings) -> Self {
        Policy {
            allow_users: s.allow_users.clone(),
            max_per_hour: s.max_actions_per_hour as usize,
            lock_on_repeat: s.lock_on_repeat,
            repeat_window_s: s.repeat_window_s as f64,
            devices_done: HashSet::new(),
            users_locked: HashSet::new(),
            offences: HashMap::new(),
            recent: VecDeque::new(),
        }
    }

    pub fn allowed(&self, user: &str) -> bool {
        self.allow_users.iter().any(|p| glob_match(p, user))
    }

    fn repeat(&self, user: &str, now_s: f64) -> bool {
        self.offences.get(user).is_some_and(|t| t.iter().any(|&at| now_s - at < self.repeat_window_s))
    }

    /// Decide on a resolved subject (`None`: resolution failed).
    pub fn decide(&mut self, subject: Option<&Subject>, origin: Origin, now_s: f64) -> Verdict {
        while self.recent.front().is_some_and(|&t| now_s - t >= HOUR_S) {
            self.recent.pop_front();
        }
        let Some(s) = subject else { return Verdict::Skip(Action::None, Outcome::Unresolved) };
        let device_done = s.device.as_ref().is_some_and(|d| self.devices_done.contains(&(s.user.clone(), d.clone())));
        if origin == Origin::Automatic && device_done {
            return Verdict::Skip(Action::LogoutDevice, Outcome::SkippedDone);
        }
        let locked_before = self.users_locked.contains(&s.user);
        let lock = match origin {
            Origin::Manual { lock } => lock,
            // A user locked once and unlocked since was unlocked by an admin on purpose: the
            // agent does not lock again on its own, it only ends the new session.
            Origin::Automatic => self.lock_on_repeat && !locked_before && self.repeat(&s.user, now_s),
        };
        let action = if lock { Action::LockUser } else { Action::LogoutDevice };
        if self.allowed(&s.user) {
            return Verdict::Skip(action, Outcome::SkippedAllowlist);
        }
        if action == Action::LockUser && locked_before {
            return Verdict::Skip(action, Outcome::SkippedDone);
        }
        if action == Action::LogoutDevice {
            if s.device.is_none() {
                return Verdict::Skip(action, Outcome::Unresolved);
            }
            if device_done {
                return Verdict::Skip(action, Outcome::SkippedDone);
            }
        }
        // An operator's command is not capped: the cap bounds what the agent does alone.
        if origin == Origin::Automatic && self.recent.len() >= self.max_per_hour {
            return Verdict::Skip(action, Outcome::RefusedCap);
        }
        Verdict::Act(action)
    }

    /// Record an action done (or, in dry-run, that would have been done): never again for
    /// that device or user, a repeat from now on, one less in this hour's budget.
    pub fn commit(&mut self, s: &Subject, action: Action, now_s: f64) {
        if self.devices_done.len() >= MAX_REMEMBERED {
            self.devices_done.clear();
        }
        if self.offences.len() >= MAX_REMEMBERED {
            self.offences.clear();
        }
        self.recent.push_back(now_s);
        match action {
            Action::LogoutDevice => {
                if let Some(d) = &s.device {
                    self.devices_done.insert((s.user.clone(), d.clone()));
                }
                let window = self.repeat_window_s;
                let times = self.offences.entry(s.user.clone()).or_default();
                times.retain(|&at| now_s - at < window);
                times.push(now_s);
            }
            Action::LockUser => {
                if self.users_locked.len() >= MAX_REMEMBERED {
                    self.users_locked.clear();
                }
                self.users_locked.insert(s.user.clone());
            }
            Action::None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::config::RespondFile;
    use std::path::Path;

    fn policy(extra: &str) -> Policy {
        let f: RespondFile = toml::from_str(extra).unwrap();
        Policy::new(&RespondSettings::from_file(Some(f), Path::new("/tmp")).unwrap())
    }

    fn subject(user: &str, device: &str) -> Subject {
        Subject { user: user.into(), device: Some(device.into()) }
    }

    #[test]
    fn first_offence_logs_out_the_device_a_repeat_locks_the_user_never_twice() {
        let mut p = policy("");
        let a = subject("@eve:hs", "D1");
        assert_eq!(p.decide(Some(&a), Origin::Automatic, 10.0), Verdict::Act(Action::LogoutDevice));
        p.commit(&a, Action::LogoutDevice, 10.0);
        assert_eq!(
            p.decide(Some(&a), Origin::Automatic, 11.0),
            Verdict::Skip(Action::LogoutDevice, Outcome::SkippedDone),
            "the session already ended is not a repeat"
        );
        let b = subject("@eve:hs", "D2");
        assert_eq!(p.decide(Some(&b), Origin::Automatic, 60.0), Verdict::Act(Action::LockUser));
        p.commit(&b, Action::LockUser, 60.0);
        let lock = Origin::Manual { lock: true };
        assert_eq!(p.decide(Some(&b), lock, 61.0), Verdict::Skip(Action::LockUser, Outcome::SkippedDone));
        // Unlocked by an admin since: a new session is ended, the account not locked again.
        let c = subject("@eve:hs", "D3");
        assert_eq!(p.decide(Some(&c), Origin::Automatic, 62.0), Verdict::Act(Action::LogoutDevice));
    }

    #[test]
    fn the_same_device_is_never_acted_on_twice() {
        let mut p = policy("lock_on_repeat = false");
        let a = subject("@eve:hs", "D1");
        p.commit(&a, Action::LogoutDevice, 0.0);
        assert_eq!(
            p.decide(Some(&a), Origin::Automatic, 1.0),
            Verdict::Skip(Action::LogoutDevice, Outcome::SkippedDone)
        );
        let b = subject("@eve:hs", "D2");
        assert_eq!(p.decide(Some(&b), Origin::Automatic, 2.0), Verdict::Act(Action::LogoutDevice));
    }

    #[test]
    fn a_repeat_outside_the_window_is_a_first_offence_again() {
        let mut p = policy("repeat_window_seconds = 100");
        p.commit(&subject("@eve:hs", "D1"), Action::LogoutDevice, 0.0);
        let b = subject("@eve:hs", "D2");
        assert_eq!(p.decide(Some(&b), Origin::Automatic, 99.0), Verdict::Act(Action::LockUser));
        assert_eq!(p.decide(Some(&b), Origin::Automatic, 100.0), Verdict::Act(Action::LogoutDevice));
    }

    #[test]
    fn allow_listed_users_and_patterns_are_never_acted_on() {
        let mut p = policy("allow_users = [\"@bot:hs\", \"@irc_*:hs\"]");
        for u in ["@bot:hs", "@irc_alice:hs", "@irc_:hs"] {
            let s = subject(u, "D");
            assert_eq!(
                p.decide(Some(&s), Origin::Automatic, 0.0),
                Verdict::Skip(Action::LogoutDevice, Outcome::SkippedAllowlist)
            );
            let manual = p.decide(Some(&s), Origin::Manual { lock: true }, 0.0);
            assert_eq!(manual, Verdict::Skip(Action::LockUser, Outcome::SkippedAllowlist));
        }
        assert_eq!(
            p.decide(Some(&subject("@bot2:hs", "D")), Origin::Automatic, 0.0),
            Verdict::Act(Action::LogoutDevice)
        );
        assert_eq!(
            p.decide(Some(&subject("@irc_a:other", "D")), Origin::Automatic, 0.0),
            Verdict::Act(Action::LogoutDevice)
        );
    }

    #[test]
    fn the_hourly_cap_refuses_automatic_actions_not_the_operator() {
        let mut p = policy("max_actions_per_hour = 2");
        for (i, t) in [0.0, 10.0].into_iter().enumerate() {
            let s = subject(&format!("@u{i}:hs"), "D");
            assert_eq!(p.decide(Some(&s), Origin::Automatic, t), Verdict::Act(Action::LogoutDevice));
            p.commit(&s, Action::LogoutDevice, t);
        }
        let s = subject("@u9:hs", "D");
        assert_eq!(
            p.decide(Some(&s), Origin::Automatic, 20.0),
            Verdict::Skip(Action::LogoutDevice, Outcome::RefusedCap)
        );
        assert_eq!(p.decide(Some(&s), Origin::Manual { lock: false }, 20.0), Verdict::Act(Action::LogoutDevice));
        assert_eq!(p.decide(Some(&s), Origin::Automatic, 3600.0), Verdict::Act(Action::LogoutDevice), "an hour later");
    }

    #[test]
    fn unsure_means_no_action() {
        let mut p = policy("");
        assert_eq!(p.decide(None, Origin::Automatic, 0.0), Verdict::Skip(Action::None, Outcome::Unresolved));
        let no_device = Subject { user: "@eve:hs".into(), device: None };
        assert_eq!(
            p.decide(Some(&no_device), Origin::Automatic, 0.0),
            Verdict::Skip(Action::LogoutDevice, Outcome::Unresolved)
        );
        assert_eq!(p.decide(Some(&no_device), Origin::Manual { lock: true }, 0.0), Verdict::Act(Action::LockUser));
    }

    #[test]
    fn reasons_and_globs() {
        assert!(reasons_match(&[], &[]));
        let want = vec!["history_paging".to_string()];
        assert!(reasons_match(&want, &[("headless", 0.5), ("history_paging", 1.0)]));
        assert!(!reasons_match(&want, &[("headless", 0.5), ("history_paging", 0.0)]));
        assert!(glob_match("@a:hs", "@a:hs") && !glob_match("@a:hs", "@ab:hs"));
        assert!(glob_match("@*_bot:*", "@x_bot:hs") && !glob_match("@*_bot:*", "@x_bat:hs"));
        assert!(glob_match("*", "") && glob_match("a*a", "aa") && !glob_match("a*a", "a"));
    }
}
