"""A whole edgeshard cluster inside a script or notebook: 3 local node processes + a server, then chat.

    python examples/sdk_chat.py                 # pulls the demo model on first use (about 100 MB)
    python examples/sdk_chat.py --nodes 2 --prompt "Write a haiku about routers."

The nodes are real processes talking gRPC on 127.0.0.1, each holding a slice of the model's layers; the
coordinator and its OpenAI-compatible API run in a background thread of this process. Leaving the `with`
block (or an exception, or Ctrl-C) stops everything.
"""

from __future__ import annotations

import argparse

from edgeshard.coordinator import LocalCluster


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--nodes", type=int, default=3, help="node processes (0: every layer in this process)"
    )
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    with LocalCluster(model=args.model, nodes=args.nodes) as cluster:
        print(f"cluster at {cluster.url}; plan:")
        for stage in cluster.plan:
            print(
                f"  {stage['node']:>10}  layers {stage['start_layer']}-{stage['end_layer'] - 1}  {stage['quant']}"
            )
        client = cluster.client()

        # streaming: text arrives piece by piece as the last node samples it
        messages = [{"role": "user", "content": args.prompt}]
        stream = client.chat(messages, stream=True, max_tokens=args.max_tokens, temperature=0)
        for piece in stream:
            print(piece, end="", flush=True)
        print(f"\n[{stream.result.finish_reason}, {stream.result.usage.completion_tokens} tokens]")

        # a follow-up turn: the history is just the list of messages
        messages += [
            {"role": "assistant", "content": stream.result.text},
            {"role": "user", "content": "Now say it in one short sentence."},
        ]
        print(client.chat(messages, max_tokens=48, temperature=0).text)

        for node in client.cluster_info()["nodes"]:
            print(
                f"  {node['node']}: {node['steps']} steps, {node.get('compute_ms_per_step', 0):.1f} ms compute/step"
            )


if __name__ == "__main__":
    main()
