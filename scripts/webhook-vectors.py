#!/usr/bin/env python3
"""Writes tests/fixtures/webhook_vectors.json: webhook signatures made by
the providers' own code, so idemgate's checks are tested against them and
not only against idemgate's own signer.

    python3 -m venv /tmp/wh && /tmp/wh/bin/pip install stripe standardwebhooks slack_sdk
    /tmp/wh/bin/python scripts/webhook-vectors.py > tests/fixtures/webhook_vectors.json

Sources:
- github: the example published in GitHub's "Validating webhook
  deliveries" documentation (secret "It's a Secret to Everybody",
  payload "Hello, World!").
- stripe: stripe-python's WebhookSignature._compute_signature, the
  function its construct_event verifies with.
- standard-webhooks: the reference Python library's Webhook.sign, and the
  specification's own test vector (msg_p5jXN8AQM9LWM0D4loKWxJek).
- slack: slack_sdk's SignatureVerifier.generate_signature.
- shopify: the recipe of Shopify's documentation (base64 of HMAC-SHA256 of
  the raw body with the app's client secret), with Python's hmac module;
  Shopify publishes no vectors and no Python verifier. Twice: in the
  X-Shopify-* headers, and in the newer form without "X-" that
  @shopify/shopify-api accepts as well (ShopifyEventsHeader in its
  lib/types.ts: shopify-hmac-sha256, shopify-event-id; its
  hmac-validator.ts checks the same HMAC under either name).
"""

import base64
import datetime
import hashlib
import hmac
import json

import stripe
from slack_sdk.signature import SignatureVerifier
from standardwebhooks import Webhook

NOW = 1764300000  # the "now" the vectors were signed at


def main():
    vectors = []
    vectors.append({
        "preset": "github",
        "source": "GitHub documentation example",
        "secret": "It's a Secret to Everybody",
        "body": "Hello, World!",
        "now": NOW,
        "headers": {
            "x-hub-signature-256":
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        },
    })

    secret = "whsec_test_stripe_5a1c"
    body = json.dumps({"id": "evt_1QxYz", "object": "event", "type": "charge.succeeded"})
    t = NOW - 30
    sig = stripe.WebhookSignature._compute_signature(f"{t}.{body}", secret)
    vectors.append({
        "preset": "stripe",
        "source": f"stripe-python {stripe.VERSION}",
        "secret": secret,
        "body": body,
        "now": NOW,
        "headers": {"stripe-signature": f"t={t},v1={sig},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"},
    })

    spec_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    spec_ts = 1614265330
    spec_body = '{"test": 2432232314}'
    spec_id = "msg_p5jXN8AQM9LWM0D4loKWxJek"
    spec_sig = Webhook(spec_secret).sign(
        spec_id, datetime.datetime.fromtimestamp(spec_ts, tz=datetime.timezone.utc), spec_body)
    assert spec_sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", spec_sig
    vectors.append({
        "preset": "standard-webhooks",
        "source": "Standard Webhooks specification test vector",
        "secret": spec_secret,
        "body": spec_body,
        "now": spec_ts + 10,
        "headers": {"webhook-id": spec_id, "webhook-timestamp": str(spec_ts), "webhook-signature": spec_sig},
    })
    body = json.dumps({"type": "invoice.paid", "data": {"id": "inv_9"}})
    sig = Webhook(spec_secret).sign(
        "msg_2", datetime.datetime.fromtimestamp(NOW, tz=datetime.timezone.utc), body)
    vectors.append({
        "preset": "standard-webhooks",
        "source": "standardwebhooks (Python reference library)",
        "secret": spec_secret,
        "body": body,
        "now": NOW,
        "headers": {"webhook-id": "msg_2", "webhook-timestamp": str(NOW),
                    "webhook-signature": "v1a,c2lnbmVk " + sig},
    })

    secret = "shpss_test_0b1c2d"
    body = json.dumps({"id": 820982911946154508, "email": "jon@example.com"})
    sig = base64.b64encode(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()).decode()
    vectors.append({
        "preset": "shopify",
        "source": "Shopify documentation recipe",
        "secret": secret,
        "body": body,
        "now": NOW,
        "headers": {"x-shopify-hmac-sha256": sig, "x-shopify-event-id": "98880550-7158-44d4-b7cd-2c97c8a091b5"},
    })
    vectors.append({
        "preset": "shopify",
        "source": "Shopify documentation recipe, newer header form",
        "secret": secret,
        "body": body,
        "now": NOW,
        "headers": {"shopify-hmac-sha256": sig, "shopify-event-id": "98880550-7158-44d4-b7cd-2c97c8a091b5"},
    })

    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    body = json.dumps({"token": "x", "team_id": "T1", "event_id": "Ev08MFMKH6", "type": "event_callback"})
    ts = str(NOW - 5)
    sig = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert SignatureVerifier(secret, clock=type("C", (), {"now": lambda self: NOW})()).is_valid(body, ts, sig)
    vectors.append({
        "preset": "slack",
        "source": "slack_sdk SignatureVerifier",
        "secret": secret,
        "body": body,
        "now": NOW,
        "headers": {"x-slack-request-timestamp": ts, "x-slack-signature": sig},
    })
    print(json.dumps(vectors, indent=2))


if __name__ == "__main__":
    main()
