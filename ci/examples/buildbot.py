# Buildbot: a master.cfg fragment — one e2e step under tether, and the janitor after it.
#
# What a real Buildbot run showed works:
# - `command` is an argv list, not a string: a string runs under `sh -c`, and that shell
#   survives a SIGKILLed worker, so tether's parent would never die (tether then notices the
#   worker's death only through its closed output pipe, see "When the CI agent itself dies" in
#   the README);
# - `sigtermTime`: when the build is stopped, the worker sends SIGTERM and waits this many
#   seconds before SIGKILL (without it: SIGKILL at once). It must cover tether's --grace plus
#   --teardown-timeout (20s + 5m here), or the teardown is cut short;
# - TETHER_RUN_ID from the builder's name and the build number (Buildbot sets no variable tether
#   reads);
# - --summary-json, for the build's own record of the run.
# Also: the renderer below squeezes the builder's name into the run-id alphabet [A-Za-z0-9._-]
# (a name with a space would make tether refuse the id, exit 125), and `usePTY=False` keeps
# tether's output on a pipe the worker reads, so tether notices the worker's death (a terminal
# is never watched).
import re
import zlib

from buildbot.plugins import steps, util

APP = "immi-main.ci.example.org"


@util.renderer
def tether_run_id(props):
    """`buildbot-<builder>-<build number>`. A builder name outside the run-id alphabet (spaces,
    slashes) is squeezed and gets the CRC-32 of the full name, so names that squeeze alike
    stay apart."""
    name = str(props.getProperty("buildername"))
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80]
    if clean != name:
        clean = "%s-%08x" % (clean, zlib.crc32(name.encode("utf-8")))
    return "buildbot-%s-%s" % (clean.lstrip("-"), props.getProperty("buildnumber"))


factory = util.BuildFactory()
factory.addStep(
    steps.ShellCommand(
        name="deploy and test",
        command=[
            "tether", "run",
            "--app", APP,
            "--deadline", "45m",
            "--grace", "20s",
            "--teardown-timeout", "5m",
            "--teardown", "/usr/local/lib/ci/undeploy.sh",
            "--summary-json", util.Interpolate("/tmp/tether-summary-%(prop:buildnumber)s.json"),
            "--", "./ci/deploy-and-test.sh",
        ],
        env={"TETHER_RUN_ID": tether_run_id},
        sigtermTime=340,
        usePTY=False,
        # tether bounds the run (--deadline); the worker's own limits only back it up.
        timeout=None,
        maxTime=60 * 60,
        haltOnFailure=True,
    )
)
factory.addStep(
    steps.ShellCommand(
        name="janitor",
        command=["tether", "janitor", "--app", APP],
        usePTY=False,
        alwaysRun=True,
    )
)
