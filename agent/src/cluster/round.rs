//! The sender's acknowledged round, sans-IO: token → change → publish → every ack, or
//! rollback; the token is released on every path once it was granted.
//!
//! [`Round`] takes the outcome of each step ([`RoundEvent`]) and answers what the
//! runtime (`service::message::round`) does next ([`RoundStep`]). A token that is not
//! granted (its wait timed out, the session is gone) ends the round before anything is
//! changed; a change that finds nothing to do publishes nothing; a refusal or a missing
//! ack (a node that left mid-round and did not answer) runs the caller's rollback.

/// What happened in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEvent {
    /// The `token` lock: granted or not.
    Token {
        /// Granted.
        granted: bool,
    },
    /// The change under the token ran.
    Change(ChangeOutcome),
    /// The message was published: every joined node acked, or not (a refusal, or a
    /// node that did not answer in time).
    Published {
        /// Every node acked positively.
        all_acked: bool,
    },
}

/// What the change under the token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Applied here: announce it.
    Applied,
    /// Nothing to change (the re-check under the token).
    Unchanged,
    /// It failed.
    Failed,
}

/// What the runtime does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStep {
    /// Run the caller's change under the token.
    RunChange,
    /// Publish the message and wait for every ack.
    Publish,
    /// Run the caller's rollback (the change was applied here, not everywhere).
    Rollback,
    /// Release the `token` lock.
    ReleaseToken,
    /// The round is over with this result.
    Done(RoundResult),
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundResult {
    /// Applied and acknowledged by every joined node.
    Applied,
    /// Nothing to change: no message sent.
    Unchanged,
    /// The token was not granted: nothing changed.
    NoToken,
    /// The change failed under the token: nothing sent.
    ChangeFailed,
    /// Not acknowledged by every node: rolled back where possible.
    NotAcked,
}

/// One round's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Round {
    /// Waiting for the token.
    #[default]
    Token,
    /// The change runs under the token.
    Changing,
    /// The message is out.
    Publishing,
    /// Over.
    Done,
}

impl Round {
    /// Takes the outcome of the step asked for, answers the next steps.
    pub fn step(&mut self, event: RoundEvent) -> Vec<RoundStep> {
        let (next, steps) = match (*self, event) {
            (Round::Token, RoundEvent::Token { granted: true }) => {
                (Round::Changing, vec![RoundStep::RunChange])
            }
            (Round::Token, RoundEvent::Token { granted: false }) => {
                (Round::Done, vec![RoundStep::Done(RoundResult::NoToken)])
            }
            (Round::Changing, RoundEvent::Change(ChangeOutcome::Applied)) => {
                (Round::Publishing, vec![RoundStep::Publish])
            }
            (Round::Changing, RoundEvent::Change(ChangeOutcome::Unchanged)) => (
                Round::Done,
                vec![
                    RoundStep::ReleaseToken,
                    RoundStep::Done(RoundResult::Unchanged),
                ],
            ),
            (Round::Changing, RoundEvent::Change(ChangeOutcome::Failed)) => (
                Round::Done,
                vec![
                    RoundStep::ReleaseToken,
                    RoundStep::Done(RoundResult::ChangeFailed),
                ],
            ),
            (Round::Publishing, RoundEvent::Published { all_acked: true }) => (
                Round::Done,
                vec![
                    RoundStep::ReleaseToken,
                    RoundStep::Done(RoundResult::Applied),
                ],
            ),
            (Round::Publishing, RoundEvent::Published { all_acked: false }) => (
                Round::Done,
                vec![
                    RoundStep::Rollback,
                    RoundStep::ReleaseToken,
                    RoundStep::Done(RoundResult::NotAcked),
                ],
            ),
            // An answer to a step not asked for: the runtime's bug. Release what may
            // be held and fail rather than publish.
            (Round::Token | Round::Done, _) => (
                Round::Done,
                vec![RoundStep::Done(RoundResult::ChangeFailed)],
            ),
            (Round::Changing | Round::Publishing, _) => (
                Round::Done,
                vec![
                    RoundStep::ReleaseToken,
                    RoundStep::Done(RoundResult::ChangeFailed),
                ],
            ),
        };
        *self = next;
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[RoundEvent]) -> Vec<RoundStep> {
        let mut r = Round::default();
        events.iter().flat_map(|&e| r.step(e)).collect()
    }

    const GRANTED: RoundEvent = RoundEvent::Token { granted: true };

    #[test]
    fn an_acked_round_releases_the_token_last() {
        assert_eq!(
            run(&[
                GRANTED,
                RoundEvent::Change(ChangeOutcome::Applied),
                RoundEvent::Published { all_acked: true }
            ]),
            vec![
                RoundStep::RunChange,
                RoundStep::Publish,
                RoundStep::ReleaseToken,
                RoundStep::Done(RoundResult::Applied)
            ]
        );
    }

    #[test]
    fn a_nack_or_a_node_that_left_mid_round_rolls_back() {
        assert_eq!(
            run(&[
                GRANTED,
                RoundEvent::Change(ChangeOutcome::Applied),
                RoundEvent::Published { all_acked: false }
            ]),
            vec![
                RoundStep::RunChange,
                RoundStep::Publish,
                RoundStep::Rollback,
                RoundStep::ReleaseToken,
                RoundStep::Done(RoundResult::NotAcked)
            ]
        );
    }

    #[test]
    fn a_lost_token_changes_and_sends_nothing() {
        assert_eq!(
            run(&[RoundEvent::Token { granted: false }]),
            vec![RoundStep::Done(RoundResult::NoToken)]
        );
    }

    #[test]
    fn nothing_to_change_or_a_failed_change_sends_nothing() {
        assert_eq!(
            run(&[GRANTED, RoundEvent::Change(ChangeOutcome::Unchanged)]),
            vec![
                RoundStep::RunChange,
                RoundStep::ReleaseToken,
                RoundStep::Done(RoundResult::Unchanged)
            ]
        );
        assert_eq!(
            run(&[GRANTED, RoundEvent::Change(ChangeOutcome::Failed)]),
            vec![
                RoundStep::RunChange,
                RoundStep::ReleaseToken,
                RoundStep::Done(RoundResult::ChangeFailed)
            ]
        );
    }

    #[test]
    fn an_answer_out_of_order_never_publishes() {
        let steps = run(&[GRANTED, RoundEvent::Published { all_acked: true }]);
        assert_eq!(
            steps,
            vec![
                RoundStep::RunChange,
                RoundStep::ReleaseToken,
                RoundStep::Done(RoundResult::ChangeFailed)
            ]
        );
        assert_eq!(
            run(&[RoundEvent::Change(ChangeOutcome::Applied)]),
            vec![RoundStep::Done(RoundResult::ChangeFailed)]
        );
    }
}
