"""The multi-node dev cluster is a cluster's shape: every node a host of its
own (address, hostname, slurmd), names that resolve everywhere, and a
cluster network that leads nowhere else."""

import subprocess

import pytest

pytestmark = pytest.mark.cluster


@pytest.fixture
def multi(cluster):
    if not cluster.multi:
        pytest.skip("needs the multi-node dev cluster (devcluster up --nodes N)")
    return cluster


def _in(host, script):
    p = subprocess.run(host.enter(["sh", "-c", script], hostname=False), capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def test_every_node_has_its_own_address_and_no_way_out_of_the_cluster_network(multi):
    subnet = multi.subnet.split("/")[0].rsplit(".", 1)[0] + "."
    others = [h for h in multi.hosts if h.netns]
    assert {h.role for h in others} >= {"hub", "build", "compute"}
    for h in others:
        rc, out = _in(h, "ip -4 -o addr show scope global; echo ROUTES; ip -4 route")
        assert rc == 0, out
        addrs, routes = out.split("ROUTES")
        assert f"inet {h.address}/" in addrs, (h.name, out)
        # the only routes are the cluster subnet's: no default route, no other network
        assert "default" not in routes, (h.name, routes)
        assert all(line.startswith(subnet) for line in routes.split("\n") if line.strip()), (h.name, routes)


def test_compute_nodes_are_named_and_resolve_every_other_host(multi):
    for node in multi.compute_nodes:
        p = multi.on_node(
            node,
            ["sh", "-c", "hostname; for n in " + " ".join(h.name for h in multi.hosts) + "; do getent hosts $n; done"],
        )
        lines = p.stdout.split("\n")
        assert lines[0] == node, p.stdout
        resolved = {words[1]: words[0] for words in (line.split() for line in lines[1:]) if len(words) >= 2}
        assert resolved == {h.name: h.address for h in multi.hosts}, p.stdout


def test_a_compute_node_reaches_the_hub_node_and_nothing_outside(multi):
    hub = multi.host("hub")
    node = multi.compute_nodes[0]
    # a listener on the hub node; the compute node connects to it
    listener = subprocess.Popen(
        hub.run_in(
            [
                "python3",
                "-c",
                "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); s.listen();"
                "print(s.getsockname()[1], flush=True); c,_=s.accept(); c.sendall(b'hub'); c.close()",
                hub.address,
            ]
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(listener.stdout.readline())
        probe = (
            "import socket,sys\n"
            "def go(a, p):\n"
            "    try:\n"
            "        s = socket.create_connection((a, p), timeout=3); d = s.recv(3); s.close(); return d.decode()\n"
            "    except OSError as e:\n"
            "        return type(e).__name__ + ':' + str(e.errno)\n"
            f"print(go({hub.address!r}, {port}))\n"
            "print(go('192.0.2.1', 80))\n"
        )  # TEST-NET-1: an address outside the cluster, never answered
        p = multi.on_node(node, ["python3", "-c", probe], timeout=30)
        reached, outside = p.stdout.split()
        assert reached == "hub", p.stdout
        # no route: refused at once (ENETUNREACH), never a packet out
        assert outside == "OSError:101", p.stdout
    finally:
        listener.kill()
        listener.wait()
