//! Carrying out a [`Plan`] through tandemd: activation steps are all-or-nothing (a failure
//! undoes, in reverse order, what this call did), deactivation steps are best effort (the
//! libvirt operation cannot be stopped any more, so every step is tried).

use control_api::ClientError;

use crate::control::Control;
use crate::decide::{Plan, Step};

/// What a plan did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub done: Vec<Step>,
    pub notes: Vec<String>,
}

/// Run one step.
pub fn run_step(control: &mut dyn Control, step: &Step) -> Result<(), ClientError> {
    match step {
        Step::Promote(v) => control.promote(v),
        Step::Demote(v) => control.demote(v),
        Step::AllowTwoPrimaries(v) => control.allow_two_primaries(v, true),
        Step::DisallowTwoPrimaries(v) => control.allow_two_primaries(v, false),
    }
}

/// A step's failure as one line: tandemd's own message when it names the volume (the
/// replication engine's refusals do), else prefixed with the step.
fn describe_failure(step: &Step, error: &ClientError) -> String {
    let message = error_chain(error);
    if matches!(error, ClientError::Api(_)) && message.contains(step.volume()) {
        message
    } else {
        format!("cannot {step}: {message}")
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Carry out `plan`. `Err` is the one-line message for libvirt (and the operator).
pub fn execute(control: &mut dyn Control, plan: &Plan) -> Result<Outcome, String> {
    match plan {
        Plan::Nothing { notes } | Plan::ExpectIncoming { notes } => Ok(Outcome {
            done: Vec::new(),
            notes: notes.clone(),
        }),
        Plan::Refuse { message } => Err(message.clone()),
        Plan::Activate { steps, notes } => {
            let mut done: Vec<Step> = Vec::new();
            for step in steps {
                if let Err(e) = run_step(control, step) {
                    let mut message = describe_failure(step, &e);
                    let mut undone = Vec::new();
                    let mut not_undone = Vec::new();
                    for earlier in done.iter().rev() {
                        let undo = earlier.undo();
                        match run_step(control, &undo) {
                            Ok(()) => undone.push(undo.to_string()),
                            Err(e) => not_undone.push(format!("{undo}: {}", error_chain(&e))),
                        }
                    }
                    if !undone.is_empty() {
                        message.push_str(&format!(" (undone: {})", undone.join(", ")));
                    }
                    if !not_undone.is_empty() {
                        message.push_str(&format!(
                            " (COULD NOT UNDO: {}; check `tandem volume status`)",
                            not_undone.join("; ")
                        ));
                    }
                    return Err(message);
                }
                done.push(step.clone());
            }
            Ok(Outcome {
                done,
                notes: notes.clone(),
            })
        }
        Plan::Deactivate { steps, notes } => {
            let mut done = Vec::new();
            let mut failures = Vec::new();
            for step in steps {
                match run_step(control, step) {
                    Ok(()) => done.push(step.clone()),
                    Err(e) => failures.push(describe_failure(step, &e)),
                }
            }
            if failures.is_empty() {
                Ok(Outcome {
                    done,
                    notes: notes.clone(),
                })
            } else {
                Err(failures.join("; "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StatusAnswer;
    use control_api::{ApiError, ErrorKind};

    /// Records calls; fails the steps listed in `fail`.
    #[derive(Default)]
    struct DummyControl {
        calls: Vec<String>,
        fail: Vec<String>,
    }

    impl DummyControl {
        fn record(&mut self, call: String) -> Result<(), ClientError> {
            let failing = self.fail.contains(&call);
            self.calls.push(call.clone());
            if failing {
                Err(ClientError::Api(ApiError::new(
                    ErrorKind::Unknown,
                    format!("{}: refused by test", call.split(' ').nth(1).unwrap_or("")),
                )))
            } else {
                Ok(())
            }
        }
    }

    impl Control for DummyControl {
        fn status(&mut self, _: &str) -> Result<StatusAnswer, ClientError> {
            unreachable!("the executor never asks for status")
        }
        fn promote(&mut self, v: &str) -> Result<(), ClientError> {
            self.record(format!("promote {v}"))
        }
        fn demote(&mut self, v: &str) -> Result<(), ClientError> {
            self.record(format!("demote {v}"))
        }
        fn allow_two_primaries(&mut self, v: &str, allow: bool) -> Result<(), ClientError> {
            self.record(format!("allow{allow} {v}"))
        }
    }

    #[test]
    fn a_failed_promotion_undoes_this_calls_changes_in_reverse() {
        let mut control = DummyControl {
            fail: vec!["promote c".into()],
            ..Default::default()
        };
        let plan = Plan::Activate {
            steps: vec![
                Step::AllowTwoPrimaries("a".into()),
                Step::Promote("a".into()),
                Step::Promote("b".into()),
                Step::Promote("c".into()),
                Step::Promote("d".into()),
            ],
            notes: vec![],
        };
        let message = execute(&mut control, &plan).unwrap_err();
        assert_eq!(
            control.calls,
            [
                "allowtrue a",
                "promote a",
                "promote b",
                "promote c",
                "demote b",
                "demote a",
                "allowfalse a"
            ]
        );
        assert_eq!(
            message,
            "c: refused by test (undone: demote b, demote a, disallow two primaries on a)"
        );
    }

    #[test]
    fn a_failed_undo_is_reported_loudly() {
        let mut control = DummyControl {
            fail: vec!["promote b".into(), "demote a".into()],
            ..Default::default()
        };
        let plan = Plan::Activate {
            steps: vec![Step::Promote("a".into()), Step::Promote("b".into())],
            notes: vec![],
        };
        let message = execute(&mut control, &plan).unwrap_err();
        assert!(
            message.contains("COULD NOT UNDO: demote a: a: refused by test"),
            "{message}"
        );
    }

    #[test]
    fn deactivation_tries_every_step() {
        let mut control = DummyControl {
            fail: vec!["demote a".into()],
            ..Default::default()
        };
        let plan = Plan::Deactivate {
            steps: vec![
                Step::Demote("a".into()),
                Step::Demote("b".into()),
                Step::DisallowTwoPrimaries("b".into()),
            ],
            notes: vec![],
        };
        let message = execute(&mut control, &plan).unwrap_err();
        assert_eq!(control.calls, ["demote a", "demote b", "allowfalse b"]);
        assert_eq!(message, "a: refused by test");
    }

    #[test]
    fn refusals_and_no_ops_touch_nothing() {
        let mut control = DummyControl::default();
        assert_eq!(
            execute(
                &mut control,
                &Plan::Refuse {
                    message: "no".into()
                }
            ),
            Err("no".into())
        );
        assert!(execute(&mut control, &Plan::Nothing { notes: vec![] }).is_ok());
        assert!(control.calls.is_empty());
    }
}
