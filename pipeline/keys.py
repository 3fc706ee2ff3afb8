"""Every Redis key pacs-embed uses: the one place that names them, for code and for operators.

Everything pacs-embed writes lives under ``pe:``. rq writes its own keys under ``rq:``: the embed
queue ``rq:queue:embed``, its jobs ``rq:job:embed-<series token>-<digest>`` (a batch's PNGs:
deleted when it finishes, kept 7 days when it fails), its registries (``rq:wip:embed``,
``rq:failed:embed``, ``rq:scheduled:embed``, ...) and its workers (``rq:worker:*``,
``rq:workers*``). Nothing else is written, so a Redis shared with other applications needs only
those two prefixes kept free, or a database of its own (the URL's ``/<db>``); a second
pacs-embed deployment always needs its own database. ``redis-cli --scan --pattern '<pattern>'``
lists a row's keys; each ``*`` stands for the part named in brackets. Values are UIDs, non-PHI
header fields, reasons, vectors and counts: no patient data.

Ledger: where every instance stands (pipeline/ledger.py). Exactly one state set or hash holds
each received instance; written by the listener's dispatcher and the workers, read by /status,
/metrics and reconciliation. Permanent: members only move between the states::

    pattern                          type    holds
    pe:received                      set     every SOP UID ever picked up from the spool
    pe:state:spooled                 set     SOP UIDs acknowledged, waiting for conversion
    pe:state:converting              set     SOP UIDs being converted
    pe:state:queued                  set     SOP UIDs converted, on their way to the endpoint
    pe:embedded                      set     SOP UIDs embedded (final)
    pe:skipped                       hash    SOP UID -> reason (final: not to be embedded)
    pe:skipped:recent                zset    SOP UID -> time skipped, for "most recent first"
    pe:failed                        hash    SOP UID -> json {stage, reason, detail, at} (final)
    pe:failed:recent                 zset    SOP UID -> time failed
    pe:counters                      hash    event -> cumulative count, never decremented
    pe:inst:*                        hash    [SOP UID] its non-PHI header fields, "frames"
                                             (those selected, "0,2,4"), "decoder", "job" (rq id),
                                             "digest" (BLAKE2b of the spooled bytes), "node"
                                             (the listener node whose spool holds it)

Listener intake: what the listener turned away (pipeline/intake.py). Written by the listener,
read by /status and /metrics. Permanent (the list is capped at 100 events)::

    pe:intake:counts                 hash    "<kind>|<reason>" -> count
    pe:intake:recent                 list    json events, newest first

Process health (pipeline/health.py). Written every few seconds by each listener's dispatcher
(components ``dispatcher``, and ``listener``: its open associations; expire 15 s after the last
renewal) and every second by each worker's janitor (component ``worker``: state and current job;
expires after 5 s, and a worker without one is dead, its job requeued: workers/janitor.py); read
by /status and /readyz::

    pe:health:*:*                    string  [component]:[host:pid] json report

rq's scheduler (moving a queue's due retries onto it) runs in whichever worker of that queue
holds its lock (workers/janitor.py); held for 5 s and renewed every second, released on stop::

    pe:scheduler:*                   string  [queue] the holder's name

Study versions (pipeline/studies.py). Written by the listener's dispatcher (arrivals) and the
push service (completions, deliveries); read by /status, /studies and the push service.
Permanent::

    pe:studystate:*                  hash    [study UID] version, state (open|complete),
                                             opened_ms, last_ms, completed_version,
                                             completed_ms, "pushed:<sink>" -> version delivered,
                                             "node" (the listener node of its latest arrival)
    pe:studymembers:*                set     [study UID] SOP UIDs received, every version
    pe:studies:due                   zset    study UID -> when to look at it next (ms)
    pe:studies:recent                zset    study UID -> last arrival (ms)
    pe:push:outbox                   zset    study UID -> completed version without push jobs yet
    pe:push:counts                   hash    "<sink>|<outcome>" -> pushes (sent, already,
                                             superseded, dead_lettered)

Spool retention (dicom_listener/retention.py): instances whose results were delivered, due for
deletion from the spool of the listener node that holds them (a node is a listener's state dir,
named in its ``node`` file; one listener per host: the host). Written by the push services,
cleared by an arrival of the instance (pipeline/studies.py). Permanent::

    pe:retention:*                   zset    [node] SOP UID -> when its spooled file may go (s)

Dead letters (pipeline/deadletters.py): pushes a sink refused for good or that failed through
every retry. Written by the push service, read by /status; ``pacs-embed requeue`` removes one.
Permanent::

    pe:deadletter                    hash    push job id -> json {sink, study_instance_uid,
                                             version, reason, at}
    pe:deadletter:recent             zset    push job id -> time dead-lettered

Arrivals (dicom_listener/arrivals.py): the hand-off from a node's listener processes to its
dispatcher. A listener pushes each instance it spooled (in batches, after the instance is durable)
and asks for a reconciliation of the spool when it starts; the dispatcher takes the list, clears
the request, and publishes how much it holds, which the listeners' back-pressure reads::

    pe:arrivals:*                    list    [node] SOP UIDs spooled, oldest first
    pe:reconcile:*                   string  [node] "1": a listener started, reconcile the spool
    pe:backlog:*                     string  [node] instances the dispatcher holds (expires)

Requeued instances (pipeline/requeue.py): failed instances an operator asked to be converted and
embedded again (``pacs-embed requeue --instance``, POST /requeue). Written by either, drained
by the listeners' dispatchers within a second::

    pe:requeue:instances             list    SOP UIDs, oldest first

Embeddings store (pipeline/store.py). Written by the workers (a vector, its verdict and its
series sum in one MULTI; a verdict revised by a reference trim); read by ``pacs-embed embeddings
export``, ``pacs-embed search`` and the admin's /search and /verdicts. An *image* is one frame
of an instance, named by its image key (pipeline/records.py): the SOP UID for frame 0 (every
single-frame object), ``<SOP UID>/<frame>`` for another frame. Permanent::

    pe:emb:vec                       hash    image -> float32 vector bytes
    pe:emb:meta                      hash    image -> json ImageRecord {sop_instance_uid, frame,
                                             study/series/sop class UIDs, modality, body_part,
                                             view}
    pe:verdict                       hash    image -> json InstanceVerdict (its record + verdict)
    pe:emb:series                    hash    series UID -> float32 normalised mean of its images
    pe:series:*                      hash    [series UID] study, sum (float64 bytes), count,
                                             "i:<image>" per image counted in the sum
    pe:study:*                       set     [study UID] its series UIDs
    pe:cohort:*                      set     [cohort, e.g. CR/CHEST] its images (search)

Reference sets (pipeline/detect/reference.py), one per cohort; the ``{cohort}`` hash tag keeps
a cohort's keys in one Redis Cluster slot. Written by the workers (admissions, trims) and
``pacs-embed reference import``; read by every worker and ``pacs-embed reference export|list``.
Permanent::

    pe:ref:cohorts                   set     every cohort that has a reference
    pe:ref:{*}:meta                  hash    [cohort] generation, version, size, k, dim,
                                             state, updated
    pe:ref:{*}:vec                   string  [cohort] size x dim float32 rows, appended
    pe:ref:{*}:knn                   string  [cohort] size x k float32 neighbour table
                                             (see pipeline/detect/scoring.py)
    pe:ref:{*}:uids                  list    [cohort] image of each row ("" when imported
                                             without UIDs)

Label check prompts (pipeline/detect/labels.py). Written and read by the workers. A cache,
permanent but safe to delete (the prompts are fetched again)::

    pe:text:*                        hash    [endpoint identity] prompt text -> float32 vector,
                                             "__scaling_factor__" -> the model's temperature

Fleet metrics (pipeline/metrics.py, pipeline/stage_metrics.py). Written by every worker's
endpoint client (requests, retries, request_seconds, slot_wait_seconds, request_bytes, images),
each listener every few seconds (cstore|status, received_bytes, associations|outcome=accepted,
conversions|outcome, conversion_seconds), the embed workers (flags|kind) and the push service
(study_completion_seconds); read by the admin's /metrics. Histograms are ``<name>|le=<bound>``
per bucket plus ``<name>|sum``. The hash is permanent (deleting it resets the counters, as a
restart would); the 10-second image counters expire after 3700 s (the admin page charts the
last hour)::

    pe:metrics                       hash    "<name>" or "<name>|<label>=<value>" -> number
    pe:metrics:images:*              string  [unix time // 10] images embedded in those 10 s

In-flight limiter (pipeline/embed/limiter.py), one per endpoint deployment. Written and read by
every worker's endpoint client; counted by the admin's /metrics. A lease expires
``endpoint.lease_seconds`` after its holder stops renewing it; the wake list expires as fast;
``pacs-embed run`` deletes both at start (its private Redis has no other holder)::

    pe:endpoint:inflight:*           zset    [endpoint identity] lease id -> expiry (ms)
    pe:endpoint:inflight:*:wake      list    [endpoint identity] one token per release

The *endpoint identity* is ``endpoint_identity(url, deployment)``: a digest (URLs are not
stored), the same on every host. Changing its definition orphans only a cache (fetched again)
and leases (expired within ``lease_seconds``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from pipeline.uids import digest

#: The prefix of every key pacs-embed writes (``pe:...``).
PREFIX = "pe"
#: The prefix of rq's keys (``rq:queue:embed``, ``rq:job:<id>``, ...), written by rq alone.
RQ_PREFIX = "rq"


@dataclass(frozen=True)
class Key:
    """One row of the namespace: a SCAN MATCH pattern, its Redis type, the module that owns it."""

    pattern: str
    type: str  # as TYPE answers: string, hash, set, zset, list
    owner: str


def _key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


# -- ledger (pipeline/ledger.py) -------------------------------------------------------------
RECEIVED = _key("received")
SPOOLED = _key("state", "spooled")
CONVERTING = _key("state", "converting")
QUEUED = _key("state", "queued")
EMBEDDED = _key("embedded")
SKIPPED = _key("skipped")
SKIPPED_RECENT = _key("skipped", "recent")
FAILED = _key("failed")
FAILED_RECENT = _key("failed", "recent")
COUNTERS = _key("counters")


def instance_key(sop_uid: str) -> str:
    return _key("inst", sop_uid)


# -- listener intake (pipeline/intake.py) ----------------------------------------------------
INTAKE_COUNTS = _key("intake", "counts")
INTAKE_RECENT = _key("intake", "recent")


# -- process health (pipeline/health.py) -----------------------------------------------------
def health_key(component: str, name: str) -> str:
    """One process's report; ``name`` ``"*"`` makes the SCAN pattern of every ``component``."""
    return _key("health", component, name)


def scheduler_lock(queue: str) -> str:
    """Who runs rq's scheduler for ``queue`` (workers/janitor.py)."""
    return _key("scheduler", queue)


# -- study versions (pipeline/studies.py) ----------------------------------------------------
def study_state_key(study_uid: str) -> str:
    return _key("studystate", study_uid)


def study_members_key(study_uid: str) -> str:
    return _key("studymembers", study_uid)


STUDIES_DUE = _key("studies", "due")
STUDIES_RECENT = _key("studies", "recent")
PUSH_OUTBOX = _key("push", "outbox")
PUSH_COUNTS = _key("push", "counts")

#: The listener node of code that is given none (tests, single-node tools).
DEFAULT_NODE = "local"


def retention_key(node: str) -> str:
    """One listener node's spooled files due for deletion."""
    return _key("retention", node)


RETENTION = retention_key(DEFAULT_NODE)

# -- dead letters (pipeline/deadletters.py) --------------------------------------------------
DEAD_LETTERS = _key("deadletter")
DEAD_LETTERS_RECENT = _key("deadletter", "recent")


# -- arrivals (dicom_listener/arrivals.py) ---------------------------------------------------
def arrivals_key(node: str) -> str:
    """Instances listener node ``node`` spooled that its dispatcher has not taken yet."""
    return _key("arrivals", node)


def reconcile_key(node: str) -> str:
    """Set by a starting listener: its node's dispatcher reconciles the spool."""
    return _key("reconcile", node)


def backlog_key(node: str) -> str:
    """How many instances node ``node``'s dispatcher holds (the listeners' back-pressure)."""
    return _key("backlog", node)


# -- requeued instances (pipeline/requeue.py) ------------------------------------------------
REQUEUE_INSTANCES = _key("requeue", "instances")


# -- embeddings store (pipeline/store.py) ----------------------------------------------------
EMB_VECTORS = _key("emb", "vec")
EMB_META = _key("emb", "meta")
VERDICTS = _key("verdict")
SERIES_VECTORS = _key("emb", "series")


def series_key(uid: str) -> str:
    return _key("series", uid)


def study_key(uid: str) -> str:
    return _key("study", uid)


def cohort_key(cohort: str) -> str:
    return _key("cohort", cohort)


# -- reference sets (pipeline/detect/reference.py) -------------------------------------------
REF_COHORTS = _key("ref", "cohorts")


def reference_keys(cohort: str) -> dict[str, str]:
    """A cohort's reference keys by part (meta, vec, knn, uids), in one cluster slot."""
    return {part: _key("ref", f"{{{cohort}}}", part) for part in ("meta", "vec", "knn", "uids")}


# -- endpoint identity: label prompts and in-flight limiter ----------------------------------
def endpoint_identity(url: str, deployment: str | None = None) -> str:
    """A short digest naming one model deployment, the same on every host (the URL is hashed,
    not stored)."""
    return digest(f"{url}\n{deployment or ''}", 16)


def prompt_cache_key(url: str, deployment: str | None = None) -> str:
    """The label prompts' text embeddings, per model (another model embeds text differently)."""
    return _key("text", endpoint_identity(url, deployment))


def inflight_key(url: str, deployment: str | None = None) -> str:
    """One endpoint deployment's in-flight leases."""
    return _key("endpoint", "inflight", endpoint_identity(url, deployment))


def wake_key(leases_key: str) -> str:
    """The wake list beside an in-flight lease set."""
    return f"{leases_key}:wake"


#: Every in-flight limiter key (leases and wake lists), for a SCAN.
INFLIGHT_PATTERN = _key("endpoint", "inflight", "*")


# -- fleet metrics (pipeline/metrics.py, pipeline/stage_metrics.py) --------------------------
METRICS = _key("metrics")


def images_rate_key(bucket: int) -> str:
    """Images embedded in 10-second bucket ``bucket`` (unix time // 10)."""
    return _key("metrics", "images", str(bucket))


# -- the whole namespace ---------------------------------------------------------------------
_LEDGER, _STORE, _REF = "pipeline.ledger", "pipeline.store", "pipeline.detect.reference"
_LIMITER = "pipeline.embed.limiter"

#: Every key pacs-embed writes, as SCAN MATCH patterns (the table in the module docstring).
NAMESPACE: tuple[Key, ...] = (
    Key(RECEIVED, "set", _LEDGER),
    Key(SPOOLED, "set", _LEDGER),
    Key(CONVERTING, "set", _LEDGER),
    Key(QUEUED, "set", _LEDGER),
    Key(EMBEDDED, "set", _LEDGER),
    Key(SKIPPED, "hash", _LEDGER),
    Key(SKIPPED_RECENT, "zset", _LEDGER),
    Key(FAILED, "hash", _LEDGER),
    Key(FAILED_RECENT, "zset", _LEDGER),
    Key(COUNTERS, "hash", _LEDGER),
    Key(instance_key("*"), "hash", _LEDGER),
    Key(INTAKE_COUNTS, "hash", "pipeline.intake"),
    Key(INTAKE_RECENT, "list", "pipeline.intake"),
    Key(health_key("*", "*"), "string", "pipeline.health"),
    Key(scheduler_lock("*"), "string", "workers.janitor"),
    Key(study_state_key("*"), "hash", "pipeline.studies"),
    Key(study_members_key("*"), "set", "pipeline.studies"),
    Key(STUDIES_DUE, "zset", "pipeline.studies"),
    Key(STUDIES_RECENT, "zset", "pipeline.studies"),
    Key(PUSH_OUTBOX, "zset", "pipeline.studies"),
    Key(PUSH_COUNTS, "hash", "workers.push"),
    Key(retention_key("*"), "zset", "dicom_listener.retention"),
    Key(DEAD_LETTERS, "hash", "pipeline.deadletters"),
    Key(DEAD_LETTERS_RECENT, "zset", "pipeline.deadletters"),
    Key(arrivals_key("*"), "list", "dicom_listener.arrivals"),
    Key(reconcile_key("*"), "string", "dicom_listener.arrivals"),
    Key(backlog_key("*"), "string", "dicom_listener.arrivals"),
    Key(REQUEUE_INSTANCES, "list", "pipeline.requeue"),
    Key(EMB_VECTORS, "hash", _STORE),
    Key(EMB_META, "hash", _STORE),
    Key(VERDICTS, "hash", _STORE),
    Key(SERIES_VECTORS, "hash", _STORE),
    Key(series_key("*"), "hash", _STORE),
    Key(study_key("*"), "set", _STORE),
    Key(cohort_key("*"), "set", _STORE),
    Key(REF_COHORTS, "set", _REF),
    Key(reference_keys("*")["meta"], "hash", _REF),
    Key(reference_keys("*")["vec"], "string", _REF),
    Key(reference_keys("*")["knn"], "string", _REF),
    Key(reference_keys("*")["uids"], "list", _REF),
    Key(_key("text", "*"), "hash", "pipeline.detect.labels"),
    Key(METRICS, "hash", "pipeline.metrics"),
    Key(_key("metrics", "images", "*"), "string", "pipeline.metrics"),
    Key(INFLIGHT_PATTERN, "zset", _LIMITER),
    Key(wake_key(INFLIGHT_PATTERN), "list", _LIMITER),
)


def declared(key: str) -> Key | None:
    """The namespace row ``key`` belongs to (the most specific pattern matching), if any."""
    matches = [k for k in NAMESPACE if fnmatch.fnmatchcase(key, k.pattern)]
    return max(matches, key=lambda k: len(k.pattern), default=None)


def text(value: Any) -> str:
    """A key, member or field as Redis returns it (bytes) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
