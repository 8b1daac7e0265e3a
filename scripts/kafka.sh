#!/usr/bin/env bash
# Runs one Apache Kafka 4.x node (broker and KRaft controller) on 127.0.0.1
# for idem's tests. The jars come from Maven Central through Maven and are
# cached outside the checkout, so a fresh machine needs only Java 17 and mvn.
#
#   scripts/kafka.sh fetch          resolve the jars (idempotent)
#   scripts/kafka.sh start DIR      format DIR, start the node, wait until it
#                                   serves; prints the bootstrap address
#   scripts/kafka.sh stop DIR       stop the node started in DIR
#   scripts/kafka.sh restart DIR    stop it and start it again on the same
#                                   ports and data (the chaos suite's
#                                   broker restarts)
#
# The node has two client listeners on 127.0.0.1: PLAINTEXT (the address
# printed, also in DIR/bootstrap) and SASL_PLAINTEXT with SCRAM-SHA-256
# (DIR/sasl_bootstrap). The SCRAM user is created when DIR is formatted,
# with a fresh random password; DIR/sasl_user and DIR/sasl_password (mode
# 600) hold them, and DIR/sasl_client.properties (mode 600), for Kafka's
# own command-line tools, holds them as a client configuration. No file of
# the broker's own configuration holds the password.
set -euo pipefail

KAFKA_VERSION="${IDEM_KAFKA_VERSION:-4.1.1}"
CACHE="${IDEM_CACHE_DIR:-$HOME/.cache/idem}/kafka-$KAFKA_VERSION"
LIBS="$CACHE/libs"

fetch() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { echo "kafka.sh: mvn is required (apt-get install maven)" >&2; exit 1; }
  mkdir -p "$CACHE"
  cat > "$CACHE/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>idem.test</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>2.0.17</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
POM
  echo "kafka.sh: resolving Apache Kafka $KAFKA_VERSION from Maven Central" >&2
  mvn -q -B -f "$CACHE/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$LIBS" -DincludeScope=runtime >&2
  touch "$LIBS/.complete"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
  local dir="$1"
  fetch
  mkdir -p "$dir"
  local port ctl sasl_port
  port=$(free_port)
  ctl=$(free_port)
  sasl_port=$(free_port)
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sasl_port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sasl_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
# SCRAM-SHA-256 on the SASL listener; its users live in the metadata log
# (created by "format --add-scram"), so the broker's JAAS entry names none.
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
controller.quorum.bootstrap.servers=127.0.0.1:$ctl
log.dirs=$dir/data
num.partitions=2
# One node: internal topics must live with a single replica, or group
# commits and transactions fail.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create every topic they use; a missing topic must stay missing.
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
PROPS
  cat > "$dir/log4j2.properties" <<'LOG'
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=FILE
appender.file.type=File
appender.file.name=FILE
appender.file.fileName=${sys:kafka.logs.dir}/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
LOG
  local cp="$LIBS/*"
  local jopts=(-Xms256m -Xmx768m -Dkafka.logs.dir="$dir" -Dlog4j2.configurationFile="$dir/log4j2.properties")
  local id sasl_user sasl_password
  id=$(java "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1) || id=""
  sasl_user=idem
  # Letters and digits only: StorageTool's --add-scram syntax has no quoting.
  sasl_password=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
  (umask 077; printf '%s\n' "$sasl_user" >"$dir/sasl_user"; printf '%s\n' "$sasl_password" >"$dir/sasl_password")
  if [ -z "$id" ] || ! java "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
    -t "$id" -c "$dir/server.properties" \
    --add-scram "SCRAM-SHA-256=[name=$sasl_user,password=$sasl_password]" >"$dir/format.log" 2>&1; then
    echo "kafka.sh: formatting the broker's storage in $dir failed; see $dir/format.log" >&2
    tail -n 20 "$dir/format.log" >&2 || true
    exit 1
  fi
  echo "127.0.0.1:$sasl_port" >"$dir/sasl_bootstrap"
  (umask 077; cat >"$dir/sasl_client.properties" <<CLIENT
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-256
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$sasl_user" password="$sasl_password";
CLIENT
  )
  launch "$dir" "$port"
}

# Starts the node whose properties and data are in DIR and waits until it
# serves on both client listeners; used by start and restart.
launch() {
  local dir="$1" port="$2"
  local cp="$LIBS/*"
  local jopts=(-Xms256m -Xmx768m -Dkafka.logs.dir="$dir" -Dlog4j2.configurationFile="$dir/log4j2.properties")
  local sasl_bootstrap
  sasl_bootstrap=$(cat "$dir/sasl_bootstrap")
  nohup java "${jopts[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties" \
    >"$dir/stdout.log" 2>&1 &
  echo $! >"$dir/pid"
  echo "127.0.0.1:$port" >"$dir/bootstrap"

  # Wait until the broker accepts a metadata request, not just a socket.
  local deadline=$((SECONDS + 120))
  until java -cp "$cp" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "127.0.0.1:$port" --list >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "kafka.sh: broker exited; see $dir/stdout.log" >&2
      tail -n 20 "$dir/stdout.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "kafka.sh: broker did not serve within 120 s; see $dir" >&2
      exit 1
    fi
    sleep 1
  done
  # The SCRAM listener must take the user created at format time.
  until java -cp "$cp" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$sasl_bootstrap" \
      --command-config "$dir/sasl_client.properties" --list >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "kafka.sh: the SASL listener did not take the SCRAM user within 120 s; see $dir" >&2
      exit 1
    fi
    sleep 1
  done
  echo "127.0.0.1:$port"
}

stop() {
  local dir="$1"
  [ -f "$dir/pid" ] || return 0
  local pid
  pid=$(cat "$dir/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

# Stops the node in DIR and starts it again on the same ports and data, as
# a broker restart in production would (for the chaos tests).
restart() {
  local dir="$1"
  stop "$dir"
  local port
  port=$(sed -E 's/.*:([0-9]+)$/\1/' "$dir/bootstrap")
  launch "$dir" "$port" >/dev/null
  cat "$dir/bootstrap"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start "${2:?usage: kafka.sh start DIR}" ;;
  stop) stop "${2:?usage: kafka.sh stop DIR}" ;;
  restart) restart "${2:?usage: kafka.sh restart DIR}" ;;
  *) echo "usage: kafka.sh fetch | start DIR | stop DIR | restart DIR" >&2; exit 2 ;;
esac
