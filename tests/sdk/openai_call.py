"""One chat completion through idemgate with openai-python, as an
application would make it, with a fixed Idempotency-Key.

    openai_call.py BASE_URL KEY MAX_RETRIES

Prints what became of it: "ok", or the status of the error the SDK raised
after its own retries.
"""

import sys

import openai

base_url, key, max_retries = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=max_retries)
try:
    client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"Idempotency-Key": key, "x-delay-ms": "1500"},
    )
    print("ok")
except openai.APIStatusError as e:
    print(e.status_code)
except openai.APIConnectionError as e:
    print("connection", type(e).__name__)
