"""Start a cluster for a class and serve it: one machine runs N node processes and the OpenAI-compatible API,
and every student talks to it with the official openai package, `edgeshard chat`, or a chat front end.

    python examples/classroom.py --nodes 3                      # on 127.0.0.1 only (try it yourself first)
    python examples/classroom.py --nodes 3 --host 0.0.0.0       # open it to the classroom network

With the students' own machines as nodes instead, the teacher makes a cluster key
(`edgeshard secret new --out cluster.key`) and hands the file out; each student runs
`edgeshard node --cluster-key-file cluster.key` and the teacher runs
`edgeshard serve --model smollm2-135m --discover --cluster-key-file cluster.key --http 0.0.0.0:8000`
(mDNS finds the nodes - only those holding the key - and the planner splits the layers by what each machine
can do). Set EDGESHARD_API_KEY on the server to make the API want a key too (docs/security.md).
"""

from __future__ import annotations

import argparse
import socket
import time

from edgeshard.coordinator import LocalCluster


def lan_address() -> str:
    """This machine's first non-loopback IPv4 address, the one students reach it by (read from the
    interfaces: nothing is sent)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves the whole network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-running", type=int, default=8, help="students generating at once; more wait")
    args = parser.parse_args()

    with LocalCluster(
        model=args.model,
        nodes=args.nodes,
        host=args.host,
        port=args.port,
        max_running=args.max_running,
        max_queued=4 * args.max_running,
    ) as cluster:
        host = lan_address() if args.host == "0.0.0.0" else args.host
        url = f"http://{host}:{args.port}"
        print(f"\nThe class cluster is up: {args.nodes} nodes serving {args.model}.")
        for stage in cluster.plan:
            print(f"  {stage['node']}: layers {stage['start_layer']}-{stage['end_layer'] - 1}")
        print(
            f"\nStudents connect with any of:\n"
            f"  edgeshard chat --url {url}\n"
            f'  python -c "from edgeshard.coordinator import Client; '
            f"print(Client('{url}').chat('Hello!').text)\"\n"
            f"  OpenAI(base_url='{url}/v1', api_key='x')   # the official openai package\n"
            f"\nLive status: {url}/v1/cluster   Ctrl-C ends the class."
        )
        client = cluster.client()
        try:
            while True:
                time.sleep(30)
                stats = client.cluster_info()["engine"]
                print(
                    f"  {stats['requests']} requests, {stats['generated_tokens']} tokens, "
                    f"{stats['running']} running, {stats['queued']} waiting"
                )
        except KeyboardInterrupt:
            print("\nstopping the cluster")


if __name__ == "__main__":
    main()
