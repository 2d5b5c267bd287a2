"""The official `openai` package against an edgeshard server: nothing edgeshard-specific but the URL.

    edgeshard serve --model smollm2-135m --local          # in one terminal (or: edgeshard cluster --nodes 3 ...)
    python examples/openai_client.py                      # in another
    python examples/openai_client.py --url http://HOST:8000/v1   # a server on another machine

Chat front ends and other OpenAI clients work the same way: point their base URL at http://HOST:PORT/v1;
the API key is not checked (any string will do).
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="Give me three tips for learning to program.")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key="not-needed")
    model = client.models.list().data[0].id  # the server serves one model
    print(f"model: {model}")

    # streamed chat: print the pieces as they come
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=128,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(
                f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]"
            )

    # a plain completion, not streamed, greedy
    done = client.completions.create(
        model=model, prompt="The three primary colors are", max_tokens=16, temperature=0
    )
    print(f"completion: {done.choices[0].text!r} ({done.choices[0].finish_reason})")


if __name__ == "__main__":
    main()
