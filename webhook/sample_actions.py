"""The actions of `license-broker send` and the live page, and what each is: in a module of their
own so that the command's argument parser needs neither the samples nor the `stripe` package."""

ACTIONS = (
    "pay",
    "fail",
    "recover",
    "resubscribe",
    "cancel_at_period_end",
    "cancel",
    "refund",
    "refund_old",
    "dispute",
    "dispute_won",
)
# What each action is, for `license-broker send --help` and the live page.
ACTION_HELP = {
    "pay": "Checkout of the first subscription; its first invoice paid",
    "fail": "the renewal invoice fails: past_due",
    "recover": "the renewal invoice is paid: active again",
    "resubscribe": "a second subscription through a new Checkout",
    "cancel_at_period_end": "the customer cancels in Stripe's customer portal (its default: at the end of the period): "
    "still unlocked until then, when Stripe ends the subscription (`cancel`)",
    "cancel": "the first subscription ends now (a second one keeps the license)",
    "refund": "every payment fully refunded: revoked",
    "refund_old": "the first period's payment refunded: nothing changes once a renewal was paid",
    "dispute": "a chargeback opened on every payment: revoked",
    "dispute_won": "the chargebacks are won: restored",
}
