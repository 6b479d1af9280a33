#!/usr/bin/env bash
# Real services for quotaflow's integration tests and local development:
# a single-node Apache Kafka 4.x (KRaft, broker+controller in one JVM) and a
# Redis, both bound to 127.0.0.1, installed once and cached OUTSIDE the repo.
#
# Usage:
#   scripts/services.sh up [kafka|redis]...   install what is missing, start
#                                             what is not running, wait until
#                                             ready, print `export ...` lines;
#                                             with both (no argument) also the
#                                             test tools: Schemathesis,
#                                             Chromium and Node
#   scripts/services.sh down [kafka|redis]... stop (TERM, then KILL); idempotent
#   scripts/services.sh status                show what runs (exit 3 if not all)
#   scripts/services.sh clean                 down, then delete the data dirs
#   scripts/services.sh classpath             print the Kafka classpath (for
#                                             the console tools), after `up`
#
# Kafka's console tools run from that classpath, e.g.
#   java -Dlog4j2.configurationFile=scripts/services/tools-log4j2.xml \
#     -cp "$(scripts/services.sh classpath)" org.apache.kafka.tools.ConsoleProducer \
#     --bootstrap-server 127.0.0.1:9092 --topic demo
# (also org.apache.kafka.tools.consumer.ConsoleConsumer, org.apache.kafka.tools.TopicCommand).
#
# `up` prints only these lines on stdout (all progress goes to stderr),
#   export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
#   export REDIS_URL=redis://127.0.0.1:6379
# (and SCHEMATHESIS, CHROMIUM, NODEJS: the tools tests/openapi.rs and
# tests/ui.rs run)
# once both answer: Redis to PING, Kafka to a full client round trip (create
# topic `quotaflow-ready`, produce to it, read it back in consumer group
# `quotaflow-ready`; see services/KafkaReady.java). A caller takes them in with
#   env=$(scripts/services.sh up) && eval "$env"
# (`eval "$(scripts/services.sh up)"` works too: on failure stdout is the
# single word `false`, so the eval fails as well.)
#
# Environment (all optional):
#   QUOTAFLOW_CACHE        cache and data root      (~/.cache/quotaflow)
#   KAFKA_PORT             PLAINTEXT listener       (9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller         (KAFKA_PORT + 1)
#   REDIS_PORT             Redis                    (6379)
#   KAFKA_START_TIMEOUT    seconds to wait for Kafka to be ready (120)
#   REDIS_START_TIMEOUT    seconds to wait for Redis to be ready (30)
#   KAFKA_STOP_TIMEOUT     seconds after TERM before KILL (60)
#   REDIS_STOP_TIMEOUT     seconds after TERM before KILL (15)
#   KAFKA_HEAP_OPTS        broker heap              (-Xms256m -Xmx512m)
#   KAFKA_PRUNE_ABOVE      `up` deletes the tests' topics (names with a
#                          `-<12 hex digits>` part, see tests/common) once the
#                          broker holds more partitions than this (4000): tests
#                          never delete theirs, and about 12,000 exhaust the
#                          heap above. Do not `up` while another test run uses
#                          the broker then. 0: never
#   KAFKA_JVM_PERFORMANCE_OPTS  broker JIT/GC flags; the default runs the C1
#                          JIT only (-XX:TieredStopAtLevel=1): about twice
#                          as fast a start, slower peak; set this to
#                          "-XX:+UseG1GC" for a broker that you benchmark
#   QUOTAFLOW_KAFKA_CDS    1 (default): class-data sharing archive for the
#                          broker, written when the first broker stops
#                          gracefully and used by later starts; 0: none
#   MAVEN_OPTS             passed to the one-time `mvn` that fetches Kafka
#
# Kafka comes from Maven Central (scripts/services/pom.xml: the broker, the
# command-line tools and a log4j2 backend), fetched once by
# `mvn dependency:copy-dependencies`; it needs java (17+) and mvn. Redis is
# Debian's redis-server (and Debian's prometheus package, whose promtool and
# server the rules' tests run), installed with apt-get when missing; so are
# Chromium and Node, for the live page's browser test. Neither service is run
# through systemd or an init script: both are started directly and tracked by
# pid files under $QUOTAFLOW_CACHE/run/.
#
# Layout under $QUOTAFLOW_CACHE:
#   kafka/<version>-<pom hash>/lib/        the Kafka classpath
#   kafka/<version>-<pom hash>/ready-<h>/  the compiled readiness check
#   kafka/<version>-<pom hash>/cds/        class-data sharing archives
#   run/kafka-<port>/  server.properties, kafka.pid, kafka.out (JVM stdout),
#                      logs/server.log (broker log), data/ (log.dirs)
#   run/redis-<port>/  redis.pid, redis.log, data/ (AOF and RDB)
#   logs/              install logs (maven, apt)
set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SVC_DIR=$SCRIPTS_DIR/services
readonly HOST=127.0.0.1

CACHE=${QUOTAFLOW_CACHE:-${HOME:-/root}/.cache/quotaflow}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-}
REDIS_PORT=${REDIS_PORT:-6379}
KAFKA_START_TIMEOUT=${KAFKA_START_TIMEOUT:-120}
REDIS_START_TIMEOUT=${REDIS_START_TIMEOUT:-30}
KAFKA_STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-60}
REDIS_STOP_TIMEOUT=${REDIS_STOP_TIMEOUT:-15}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}
KAFKA_PRUNE_ABOVE=${KAFKA_PRUNE_ABOVE:-4000}
KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:TieredStopAtLevel=1}
KAFKA_CDS=${QUOTAFLOW_KAFKA_CDS:-1}
TOOLS_JVM_OPTS="-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"

log() { printf 'services: %s\n' "$*" >&2; }
die() {
  printf 'services: error: %s\n' "$*" >&2
  exit 1
}

for v in KAFKA_PORT REDIS_PORT KAFKA_START_TIMEOUT REDIS_START_TIMEOUT KAFKA_STOP_TIMEOUT REDIS_STOP_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
[[ -n $KAFKA_CONTROLLER_PORT ]] || KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
[[ $KAFKA_CONTROLLER_PORT =~ ^[0-9]+$ ]] || die "KAFKA_CONTROLLER_PORT must be a number"
[[ $KAFKA_CONTROLLER_PORT != "$KAFKA_PORT" ]] || die "KAFKA_CONTROLLER_PORT must differ from KAFKA_PORT"

KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$SVC_DIR/pom.xml")
[[ -n $KAFKA_VERSION ]] || die "no <kafka.version> in $SVC_DIR/pom.xml"
KAFKA_HOME=$CACHE/kafka/$KAFKA_VERSION-$(sha256sum <"$SVC_DIR/pom.xml" | cut -c1-12)
readonly KAFKA_LIB=$KAFKA_HOME/lib
READY_CLASSES=$KAFKA_HOME/ready-$(sha256sum <"$SVC_DIR/KafkaReady.java" | cut -c1-12)
readonly KAFKA_CDS_DIR=$KAFKA_HOME/cds
JAVA_KEY="" # hash of `java -version`, set by need_java (CDS archives are per JVM build)
readonly KAFKA_RUN=$CACHE/run/kafka-$KAFKA_PORT
readonly KAFKA_PIDFILE=$KAFKA_RUN/kafka.pid
readonly KAFKA_READYFILE=$KAFKA_RUN/ready.pid
readonly KAFKA_LOG=$KAFKA_RUN/logs/server.log
readonly KAFKA_OUT=$KAFKA_RUN/kafka.out
readonly REDIS_RUN=$CACHE/run/redis-$REDIS_PORT
readonly REDIS_PIDFILE=$REDIS_RUN/redis.pid
readonly REDIS_LOG=$REDIS_RUN/redis.log

# ---------------------------------------------------------------- helpers --

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# Who listens on port $1 (best effort, for error messages).
port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$1" 2>/dev/null || true
  fi
}

# True when pid $1 is a live (not zombie) process whose command line contains $2.
pid_matches() {
  local pid=$1 pattern=$2 state cmdline
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/stat ]] || return 1
  state=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$pattern"* ]]
}

# Prints the pid from pid file $1 when that process is alive and matches $2.
live_pid() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(head -n1 "$1" 2>/dev/null | tr -dc '0-9')
  pid_matches "$pid" "$2" || return 1
  printf '%s\n' "$pid"
}

kafka_pattern() { printf '%s' "kafka.Kafka $KAFKA_RUN/server.properties"; }
redis_pattern() { printf '%s' "redis-server"; }

kafka_pid() { live_pid "$KAFKA_PIDFILE" "$(kafka_pattern)"; }
redis_pid() { live_pid "$REDIS_PIDFILE" "$(redis_pattern)"; }

redis_ping() {
  [[ $(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# Prints the lines that file $1 gained after it was $2 bytes long (the last 60).
show_new() {
  local f=$1 from=$2
  if [[ -s $f ]] && (($(stat -c %s "$f") > from)); then
    printf -- '----- last lines of %s -----\n' "$f" >&2
    tail -c +$((from + 1)) "$f" | tail -n 60 >&2
    printf -- '-----\n' >&2
  fi
}

# Prints the last lines of each existing file given, to stderr.
show_tail() {
  local f
  for f in "$@"; do
    if [[ -s $f ]]; then
      printf -- '----- last lines of %s -----\n' "$f" >&2
      tail -n 40 "$f" >&2
      printf -- '-----\n' >&2
    fi
  done
}

# Stops pid $2 (service name $1): TERM, wait up to $3 seconds, then KILL.
stop_pid() {
  local name=$1 pid=$2 wait_s=$3 pattern=$4 i
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 5; i++)); do
    pid_matches "$pid" "$pattern" || {
      log "$name stopped"
      return 0
    }
    sleep 0.2
  done
  log "$name did not stop within ${wait_s}s; sending KILL"
  STOP_KILLED=1
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_matches "$pid" "$pattern" || {
      log "$name killed"
      return 0
    }
    sleep 0.2
  done
  die "$name (pid $pid) is still alive after KILL"
}

# Schemathesis (PyPI) drives the running sidecar from its OpenAPI document
# in tests/openapi.rs; installed once into a virtualenv under the cache.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=$CACHE/venv-schemathesis-$SCHEMATHESIS_VERSION

install_schemathesis() {
  [[ -x $SCHEMATHESIS_VENV/bin/st ]] && return 0
  local log_file=$CACHE/logs/schemathesis-install.log
  mkdir -p "$CACHE/logs"
  log "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV (once; log: $log_file)"
  # `st` is written last by pip: its presence means a whole install.
  {
    python3 -m venv "$SCHEMATHESIS_VENV" &&
      "$SCHEMATHESIS_VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  } </dev/null >"$log_file" 2>&1 || {
    show_tail "$log_file"
    rm -rf "$SCHEMATHESIS_VENV"
    die "could not install schemathesis (see $log_file)"
  }
}

# Headless Chromium and Node drive the live page (GET /ui) in tests/ui.rs
# through tests/ui/driver.mjs, which needs no npm package (the DevTools
# protocol over a pipe). Both from Debian, installed once when missing.
browser_installed() {
  command -v chromium >/dev/null 2>&1 && command -v node >/dev/null 2>&1
}

install_browser() {
  browser_installed && return 0
  command -v apt-get >/dev/null 2>&1 || die "chromium or node is missing and apt-get is not available to install them"
  local apt_log=$CACHE/logs/browser-install.log rc=0 packages=()
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  command -v node >/dev/null 2>&1 || packages+=(nodejs)
  mkdir -p "$CACHE/logs"
  log "installing ${packages[*]} with apt-get (once; log: $apt_log)"
  {
    as_root apt-get -o DPkg::Lock::Timeout=300 update &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y --no-install-recommends "${packages[@]}"
  } </dev/null >"$apt_log" 2>&1 || rc=$?
  if ((rc != 0)) || ! browser_installed; then
    show_tail "$apt_log"
    die "could not install ${packages[*]} with apt-get (exit $rc); see $apt_log"
  fi
  log "installed: $(chromium --version 2>/dev/null | head -n1), node $(node --version)"
}

need_java() {
  command -v java >/dev/null 2>&1 || die "java not found on PATH (Kafka needs Java 17 or newer)"
  local v major
  v=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)
  major=${v%%.*}
  [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$v")
  [[ $major =~ ^[0-9]+$ ]] || die "could not read the Java version from 'java -version' (got '$v')"
  ((major >= 17)) || die "Kafka $KAFKA_VERSION needs Java 17 or newer; 'java' is $v"
  set_java_key
}

set_java_key() {
  JAVA_KEY=$({ readlink -f "$(command -v java)"; java -version 2>&1; } | sha256sum | cut -c1-12)
}

# The Kafka classpath as an explicit, sorted jar list (stable across runs,
# which a class-data sharing archive requires).
kafka_classpath() {
  local cp
  cp=$(printf '%s:' "$KAFKA_LIB"/*.jar)
  printf '%s\n' "${cp%:}"
}

# Runs apt-get as root, or through passwordless sudo.
as_root() {
  if [[ $(id -u) == 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) to run: $*"
  fi
}

# --------------------------------------------------------------- installs --

kafka_installed() {
  [[ -f $KAFKA_HOME/.complete && -f $READY_CLASSES/KafkaReady.class ]]
}

install_kafka() {
  need_java
  local tmp mvn_log rc=0
  mkdir -p "$CACHE/kafka" "$CACHE/logs"
  if [[ ! -f $KAFKA_HOME/.complete ]]; then
    command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once, to fetch Kafka $KAFKA_VERSION from Maven Central)"
    tmp=$(mktemp -d "$CACHE/kafka/.install.XXXXXX")
    mvn_log=$CACHE/logs/kafka-install.log
    log "fetching Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once; log: $mvn_log)"
    # Run on a copy of the pom so Maven writes nothing inside the repo.
    cp "$SVC_DIR/pom.xml" "$tmp/pom.xml"
    (cd "$tmp" && mvn -B -ntp -f "$tmp/pom.xml" \
      org.apache.maven.plugins:maven-dependency-plugin:3.11.0:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp/lib") </dev/null >"$mvn_log" 2>&1 || rc=$?
    if ((rc != 0)) || ! compgen -G "$tmp/lib/kafka_2.13-*.jar" >/dev/null; then
      show_tail "$mvn_log"
      rm -rf "$tmp"
      die "could not fetch Kafka $KAFKA_VERSION with Maven (exit $rc); see $mvn_log"
    fi
    rm -rf "$tmp/pom.xml" "$tmp/target"
    touch "$tmp/.complete"
    rm -rf "$KAFKA_HOME"
    mv -T "$tmp" "$KAFKA_HOME"
    log "Kafka $KAFKA_VERSION installed ($(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars)"
  fi
  if [[ ! -f $READY_CLASSES/KafkaReady.class ]]; then
    command -v javac >/dev/null 2>&1 || die "javac not found on PATH (a JDK 17+ is needed to build the Kafka readiness check)"
    tmp=$(mktemp -d "$KAFKA_HOME/.ready.XXXXXX")
    javac -nowarn -d "$tmp" -cp "$KAFKA_LIB/*" "$SVC_DIR/KafkaReady.java" >&2 ||
      {
        rm -rf "$tmp"
        die "could not compile $SVC_DIR/KafkaReady.java"
      }
    rm -rf "$READY_CLASSES"
    mv -T "$tmp" "$READY_CLASSES"
  fi
}

redis_installed() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1
}

# Debian's prometheus package: promtool checks and unit-tests the rules in
# deploy/prometheus, and tests/prometheus_live.rs runs its server against
# the binary. Installed with Redis, in the same apt run; both binaries are
# checked, so a promtool from elsewhere still gets the server installed.
prometheus_installed() {
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
}

install_redis() {
  redis_installed && prometheus_installed && return 0
  command -v apt-get >/dev/null 2>&1 || die "redis-server is not installed and apt-get is not available to install it"
  local apt_log=$CACHE/logs/redis-install.log rc=0 packages=()
  redis_installed || packages+=(redis-server)
  prometheus_installed || packages+=(prometheus)
  mkdir -p "$CACHE/logs"
  log "installing ${packages[*]} with apt-get (once; log: $apt_log)"
  {
    # Wait for the dpkg/apt locks instead of failing when another apt runs.
    as_root apt-get -o DPkg::Lock::Timeout=300 update &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y --no-install-recommends "${packages[@]}"
  } </dev/null >"$apt_log" 2>&1 || rc=$?
  if ((rc != 0)) || ! redis_installed || ! prometheus_installed; then
    show_tail "$apt_log"
    die "could not install ${packages[*]} with apt-get (exit $rc); see $apt_log"
  fi
  # The tests run their own Prometheus servers: stop the one the package's
  # init script may have started.
  local prom_pid
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if prom_pid=$(live_pid /run/prometheus/prometheus.pid prometheus); then
    log "stopping the system prometheus the package started (pid $prom_pid)"
    stop_pid "system prometheus" "$prom_pid" "$REDIS_STOP_TIMEOUT" prometheus
  fi
  # Where the package's init script did start a system Redis (no policy-rc.d
  # to stop it), stop it again: this script runs its own, on its own port.
  local sys_pid
  if sys_pid=$(live_pid /run/redis/redis-server.pid redis-server); then
    log "stopping the system redis-server the package started (pid $sys_pid)"
    stop_pid "system redis-server" "$sys_pid" "$REDIS_STOP_TIMEOUT" redis-server
  fi
  log "redis-server installed: $(redis-server --version | head -n1)"
}

# ------------------------------------------------------------------ Kafka --

kafka_write_config() {
  mkdir -p "$KAFKA_RUN/data" "$KAFKA_RUN/logs"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
    -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    -e "s|@DATA_DIR@|$KAFKA_RUN/data|g" \
    "$SVC_DIR/server.properties.template" >"$KAFKA_RUN/server.properties.tmp"
  mv -f "$KAFKA_RUN/server.properties.tmp" "$KAFKA_RUN/server.properties"
  cp -f "$SVC_DIR/log4j2.xml" "$KAFKA_RUN/log4j2.xml"
  cp -f "$SVC_DIR/tools-log4j2.xml" "$KAFKA_RUN/tools-log4j2.xml"
}

# Runs a short-lived JVM (a Kafka tool or the readiness check): kafka_tool CLASSPATH MAIN ARGS...
kafka_tool() {
  local cp=$1
  shift
  # shellcheck disable=SC2086
  java $TOOLS_JVM_OPTS -XX:ErrorFile="$KAFKA_RUN/logs/hs_err_tool_%p.log" \
    -Dlog4j2.configurationFile="$KAFKA_RUN/tools-log4j2.xml" -cp "$cp" "$@"
}

kafka_format_if_needed() {
  [[ -f $KAFKA_RUN/data/meta.properties ]] && return 0
  local cluster_id fmt_log=$KAFKA_RUN/logs/format.log
  # No meta.properties: never formatted (or formatting was cut short).
  rm -rf "$KAFKA_RUN/data"
  mkdir -p "$KAFKA_RUN/data"
  cluster_id=$(kafka_tool "$(kafka_classpath)" kafka.tools.StorageTool random-uuid 2>"$fmt_log" | tail -n1) ||
    {
      show_tail "$fmt_log"
      die "kafka-storage random-uuid failed"
    }
  log "formatting Kafka storage in $KAFKA_RUN/data (cluster id $cluster_id)"
  kafka_tool "$(kafka_classpath)" kafka.tools.StorageTool format --standalone -t "$cluster_id" \
    -c "$KAFKA_RUN/server.properties" >>"$fmt_log" 2>&1 ||
    {
      show_tail "$fmt_log"
      die "formatting Kafka storage failed; see $fmt_log"
    }
}

KAFKA_LOG_FROM=0 # size of server.log when this start began: show only what it added

kafka_fail() {
  show_tail "$KAFKA_OUT"
  show_new "$KAFKA_LOG" "$KAFKA_LOG_FROM"
  die "$*"
}

# Runs the readiness check against the broker with pid $1 (KafkaReady:
# metadata, topic creation, produce, consume in a group). It starts at once
# and retries, so its JVM start overlaps the broker's.
# Returns 0 when ready, 2 when the broker exited, 1 on timeout.
kafka_check_ready() {
  local pid=$1 rc=0
  # shellcheck disable=SC2086
  timeout -k 5 $((KAFKA_START_TIMEOUT + 15)) \
    java $TOOLS_JVM_OPTS -XX:ErrorFile="$KAFKA_RUN/logs/hs_err_tool_%p.log" \
    -Dlog4j2.configurationFile="$KAFKA_RUN/tools-log4j2.xml" \
    -cp "$READY_CLASSES:$(kafka_classpath)" KafkaReady "$HOST:$KAFKA_PORT" "$KAFKA_START_TIMEOUT" "$pid" >&2 || rc=$?
  case $rc in
    0 | 2) return "$rc" ;;
    *) return 1 ;;
  esac
}

# Like kafka_check_ready, but fails the script unless the broker gets ready.
kafka_wait_ready() {
  local pid=$1 start=$SECONDS rc=0
  kafka_check_ready "$pid" || rc=$?
  case $rc in
    0) ;;
    2) kafka_fail "Kafka (pid $pid) exited during startup" ;;
    *) kafka_fail "Kafka on $HOST:$KAFKA_PORT did not become ready within ${KAFKA_START_TIMEOUT}s; it is left running (pid $pid): 'scripts/services.sh down' stops it" ;;
  esac
  kafka_mark_ready "$pid" "$start"
}

kafka_mark_ready() {
  printf '%s\n' "$1" >"$KAFKA_READYFILE"
  log "Kafka $KAFKA_VERSION ready on $HOST:$KAFKA_PORT (pid $1, $((SECONDS - $2))s)"
}

# Starts the broker in the background; prints its pid. $1: "share" to use
# the class-data sharing archive, "record" to write one at exit, "none".
kafka_launch() {
  local cds=$1 i cds_opts=()
  case $cds in
    share) cds_opts=(-XX:SharedArchiveFile="$(kafka_cds_archive)") ;;
    # The archive is written when this broker exits (see kafka_down), to a
    # file named by its pid; -Xlog keeps the JVM's CDS warnings out of kafka.out.
    record) cds_opts=(-XX:ArchiveClassesAtExit="$(kafka_cds_archive @PID@)" "-Xlog:cds*=off") ;;
  esac
  : >"$KAFKA_OUT"
  rm -f "$KAFKA_PIDFILE"
  # setsid: its own session, so the broker outlives this script and the
  # caller's terminal. The wrapper records the broker's pid (and puts it in
  # the CDS file name), then execs java, which keeps that pid.
  # shellcheck disable=SC2016,SC2086
  (cd "$KAFKA_RUN" && exec setsid bash -c 'echo $$ >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "${@//@PID@/$$}"' "$KAFKA_PIDFILE" \
    java $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS -server -Djava.awt.headless=true "${cds_opts[@]}" \
    -Dlog4j2.configurationFile="$KAFKA_RUN/log4j2.xml" -Dkafka.logs.dir="$KAFKA_RUN/logs" \
    -cp "$(kafka_classpath)" kafka.Kafka "$KAFKA_RUN/server.properties") \
    </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
  for ((i = 0; i < 50; i++)); do
    [[ -s $KAFKA_PIDFILE ]] && break
    sleep 0.1
  done
  head -n1 "$KAFKA_PIDFILE" 2>/dev/null || kafka_fail "Kafka did not start (no pid file $KAFKA_PIDFILE)"
}

kafka_up() {
  local pid p cds=none start=$SECONDS rc=0
  if pid=$(kafka_pid); then
    if [[ $(cat "$KAFKA_READYFILE" 2>/dev/null) == "$pid" ]] && port_open "$KAFKA_PORT"; then
      log "Kafka already running on $HOST:$KAFKA_PORT (pid $pid)"
      return 0
    fi
    log "Kafka (pid $pid) is running but not yet known ready; waiting"
    KAFKA_LOG_FROM=$(stat -c %s "$KAFKA_LOG" 2>/dev/null || echo 0)
    kafka_wait_ready "$pid"
    return 0
  fi
  rm -f "$KAFKA_PIDFILE" "$KAFKA_READYFILE"
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    if port_open "$p"; then
      port_owner "$p" >&2
      die "port $HOST:$p is already in use by a process this script did not start; stop it or set KAFKA_PORT/KAFKA_CONTROLLER_PORT"
    fi
  done
  kafka_write_config
  kafka_format_if_needed
  if [[ $KAFKA_CDS == 1 ]]; then
    mkdir -p "$KAFKA_CDS_DIR"
    kafka_cds_prune
    if [[ -s $(kafka_cds_archive) ]]; then cds=share; else cds=record; fi
  fi
  log "starting Kafka $KAFKA_VERSION on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT; log $KAFKA_LOG)"
  KAFKA_LOG_FROM=$(stat -c %s "$KAFKA_LOG" 2>/dev/null || echo 0)
  pid=$(kafka_launch "$cds")
  kafka_check_ready "$pid" || rc=$?
  if ((rc == 2)) && [[ $cds == share ]]; then
    # A damaged archive can crash the JVM at start: drop it, start without.
    show_tail "$KAFKA_OUT"
    log "Kafka exited at startup while using $(kafka_cds_archive); deleting that archive and starting without it"
    rm -f "$(kafka_cds_archive)"
    pid=$(kafka_launch none)
    rc=0
    kafka_check_ready "$pid" || rc=$?
  fi
  case $rc in
    0) kafka_mark_ready "$pid" "$start" ;;
    2) kafka_fail "Kafka (pid $pid) exited during startup" ;;
    *) kafka_fail "Kafka on $HOST:$KAFKA_PORT did not become ready within ${KAFKA_START_TIMEOUT}s; it is left running (pid $pid): 'scripts/services.sh down' stops it" ;;
  esac
}

# Deletes the topics earlier test runs left, once there are too many (see
# KAFKA_PRUNE_ABOVE). Partitions are counted as the broker's data dirs.
kafka_prune_test_topics() {
  local n
  ((KAFKA_PRUNE_ABOVE > 0)) || return 0
  n=$(find "$KAFKA_RUN/data" -mindepth 1 -maxdepth 1 -type d -name '*-[0-9]*' 2>/dev/null | wc -l)
  ((n > KAFKA_PRUNE_ABOVE)) || return 0
  log "Kafka holds $n partitions (more than KAFKA_PRUNE_ABOVE=$KAFKA_PRUNE_ABOVE): deleting the topics earlier test runs left"
  kafka_tool "$(kafka_classpath)" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" --delete --if-exists \
    --topic '.*-[0-9a-f]{12}(-.*)?' >&2 ||
    log "deleting the old test topics failed; 'scripts/services.sh clean' starts an empty broker"
}

# The broker's class-data sharing archive for this JVM; with an argument,
# the one that the broker with that pid writes when it exits.
kafka_cds_archive() {
  if (($# > 0)); then
    printf '%s\n' "$KAFKA_CDS_DIR/broker-$JAVA_KEY.pid-$1.jsa"
  else
    printf '%s\n' "$KAFKA_CDS_DIR/broker-$JAVA_KEY.jsa"
  fi
}

# Deletes archives half-written by brokers that are gone.
kafka_cds_prune() {
  local f p
  for f in "$KAFKA_CDS_DIR"/broker-*.pid-*.jsa; do
    [[ -e $f ]] || continue
    p=${f##*.pid-}
    p=${p%.jsa}
    pid_matches "$p" kafka.Kafka || rm -f "$f"
  done
}

# After broker $1 exited: keep the archive it wrote if it stopped gracefully.
kafka_cds_promote() {
  local pid=$1 graceful=$2 tmp
  [[ $KAFKA_CDS == 1 && -n $JAVA_KEY ]] || return 0
  tmp=$(kafka_cds_archive "$pid")
  [[ -e $tmp ]] || return 0
  # Keep it only if a JVM can map it (a cut-short archive crashes the JVM).
  if [[ $graceful == 1 && -s $tmp && ! -e $(kafka_cds_archive) ]] &&
    java -Xshare:on -XX:SharedArchiveFile="$tmp" -XX:ErrorFile="$KAFKA_CDS_DIR/hs_err_check_%p.log" \
      -cp "$(kafka_classpath)" -version >/dev/null 2>&1; then
    mv -f "$tmp" "$(kafka_cds_archive)"
    log "saved a class-data sharing archive for faster Kafka starts: $(kafka_cds_archive)"
  else
    rm -f "$tmp"
  fi
  rm -f "$KAFKA_CDS_DIR"/hs_err_check_*.log
}

kafka_down() {
  local pid
  if pid=$(kafka_pid); then
    if [[ $KAFKA_CDS == 1 ]] && command -v java >/dev/null 2>&1; then set_java_key; fi
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '-XX:ArchiveClassesAtExit='; then
      log "Kafka writes a class-data sharing archive as it stops (once); that takes a few seconds"
    fi
    STOP_KILLED=0
    stop_pid Kafka "$pid" "$KAFKA_STOP_TIMEOUT" "$(kafka_pattern)"
    kafka_cds_promote "$pid" $((1 - STOP_KILLED))
  else
    log "Kafka is not running"
  fi
  rm -f "$KAFKA_PIDFILE" "$KAFKA_READYFILE"
  if port_open "$KAFKA_PORT"; then
    log "note: $HOST:$KAFKA_PORT is still in use by a process this script did not start; left alone"
  fi
}

kafka_status() {
  local pid
  if pid=$(kafka_pid); then
    if port_open "$KAFKA_PORT"; then
      echo "kafka: running (pid $pid) on $HOST:$KAFKA_PORT, version $KAFKA_VERSION; data $KAFKA_RUN/data; log $KAFKA_LOG"
      return 0
    fi
    echo "kafka: starting (pid $pid), $HOST:$KAFKA_PORT not open yet; log $KAFKA_LOG"
    return 1
  fi
  if port_open "$KAFKA_PORT"; then
    echo "kafka: not started by this script, but $HOST:$KAFKA_PORT is in use"
  else
    echo "kafka: stopped"
  fi
  return 1
}

# ------------------------------------------------------------------ Redis --

redis_up() {
  local pid start=$SECONDS err_file
  if pid=$(redis_pid) && redis_ping; then
    log "Redis already running on $HOST:$REDIS_PORT (pid $pid)"
    return 0
  fi
  if [[ -z ${pid:-} ]]; then
    rm -f "$REDIS_PIDFILE"
    if port_open "$REDIS_PORT"; then
      port_owner "$REDIS_PORT" >&2
      die "port $HOST:$REDIS_PORT is already in use by a process this script did not start; stop it or set REDIS_PORT"
    fi
    mkdir -p "$REDIS_RUN/data"
    err_file=$REDIS_RUN/redis-start.err
    log "starting Redis on $HOST:$REDIS_PORT (log $REDIS_LOG)"
    redis-server --port "$REDIS_PORT" --bind "$HOST" --daemonize yes \
      --pidfile "$REDIS_PIDFILE" --dir "$REDIS_RUN/data" --logfile "$REDIS_LOG" \
      --appendonly yes </dev/null >"$err_file" 2>&1 9>&- ||
      {
        show_tail "$err_file" "$REDIS_LOG"
        die "redis-server failed to start"
      }
  fi
  while ! redis_ping; do
    if ((SECONDS - start > 3)) && ! redis_pid >/dev/null; then
      show_tail "$REDIS_LOG"
      die "Redis exited during startup (or wrote no pid file to $REDIS_PIDFILE)"
    fi
    if ((SECONDS - start >= REDIS_START_TIMEOUT)); then
      show_tail "$REDIS_LOG"
      die "Redis on $HOST:$REDIS_PORT did not answer PING within ${REDIS_START_TIMEOUT}s"
    fi
    sleep 0.1
  done
  pid=$(redis_pid) || {
    show_tail "$REDIS_LOG"
    die "Redis answers on $HOST:$REDIS_PORT but its pid file $REDIS_PIDFILE names no live redis-server"
  }
  log "Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') ready on $HOST:$REDIS_PORT (pid $pid)"
}

redis_down() {
  local pid
  if pid=$(redis_pid); then
    stop_pid Redis "$pid" "$REDIS_STOP_TIMEOUT" "$(redis_pattern)"
  else
    log "Redis is not running"
  fi
  rm -f "$REDIS_PIDFILE"
  if port_open "$REDIS_PORT"; then
    log "note: $HOST:$REDIS_PORT is still in use by a process this script did not start; left alone"
  fi
}

redis_status() {
  local pid
  if pid=$(redis_pid); then
    if redis_installed && redis_ping; then
      echo "redis: running (pid $pid) on $HOST:$REDIS_PORT; data $REDIS_RUN/data; log $REDIS_LOG"
      return 0
    fi
    echo "redis: starting (pid $pid), no PONG on $HOST:$REDIS_PORT yet; log $REDIS_LOG"
    return 1
  fi
  if port_open "$REDIS_PORT"; then
    echo "redis: not started by this script, but $HOST:$REDIS_PORT is in use"
  else
    echo "redis: stopped"
  fi
  return 1
}

# ------------------------------------------------------------------- main --

lock() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.services.lock"
  flock -w 900 9 || die "another scripts/services.sh holds $CACHE/.services.lock"
}

# Which services a command acts on: the arguments, or both.
select_services() {
  WANT_KAFKA=0 WANT_REDIS=0
  (($# > 0)) || set -- kafka redis
  local s
  for s in "$@"; do
    case $s in
      kafka) WANT_KAFKA=1 ;;
      redis) WANT_REDIS=1 ;;
      *) die "unknown service '$s' (kafka or redis)" ;;
    esac
  done
}

cmd_up() {
  select_services "$@"
  lock
  local redis_job=""
  # Fresh machine: apt (Redis) and Maven (Kafka) downloads run side by side.
  if ((WANT_REDIS)) && ! { redis_installed && prometheus_installed; }; then
    install_redis &
    redis_job=$!
  fi
  if ((WANT_KAFKA)) && ! kafka_installed; then
    install_kafka
  fi
  if [[ -n $redis_job ]]; then
    wait "$redis_job" || die "installing Redis failed"
  fi
  if ((WANT_KAFKA)); then need_java; fi
  if ((WANT_REDIS)); then redis_up; fi
  if ((WANT_KAFKA)); then
    kafka_up
    kafka_prune_test_topics
  fi
  # Not services, but what the test command needs beside them: only for a
  # full `up` (`up redis` stays a Redis, not a browser download).
  if ((WANT_KAFKA && WANT_REDIS)); then
    install_schemathesis
    install_browser
    echo "export SCHEMATHESIS=$SCHEMATHESIS_VENV/bin/st"
    echo "export CHROMIUM=$(command -v chromium)"
    echo "export NODEJS=$(command -v node)"
  fi
  if ((WANT_KAFKA)); then echo "export KAFKA_BOOTSTRAP_SERVERS=$HOST:$KAFKA_PORT"; fi
  if ((WANT_REDIS)); then echo "export REDIS_URL=redis://$HOST:$REDIS_PORT"; fi
}

cmd_down() {
  select_services "$@"
  lock
  if ((WANT_KAFKA)); then kafka_down; fi
  if ((WANT_REDIS)); then redis_down; fi
}

cmd_status() {
  local rc=0
  kafka_status || rc=3
  redis_status || rc=3
  return "$rc"
}

cmd_clean() {
  cmd_down "$@"
  if ((WANT_KAFKA)); then
    log "deleting $KAFKA_RUN"
    rm -rf "$KAFKA_RUN"
  fi
  if ((WANT_REDIS)); then
    log "deleting $REDIS_RUN"
    rm -rf "$REDIS_RUN"
  fi
}

cmd_classpath() {
  [[ -f $KAFKA_HOME/.complete ]] || die "Kafka is not installed yet; run: scripts/services.sh up kafka"
  kafka_classpath
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
}

main() {
  local cmd=${1:-}
  (($# > 0)) && shift
  case $cmd in
    up)
      # On failure, leave `false` on stdout so `eval "$(services.sh up)"` fails.
      trap 'rc=$?; if ((rc != 0)); then echo false; fi' EXIT
      cmd_up "$@"
      ;;
    down) cmd_down "$@" ;;
    status) cmd_status ;;
    clean) cmd_clean "$@" ;;
    classpath) cmd_classpath ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 64
      ;;
  esac
}

main "$@"
