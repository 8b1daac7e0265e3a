#!/bin/sh
# Produces sample orders forever, one in five sent twice, so that the
# dashboard shows applied and duplicate records moving.
n=0
while true; do
  i=0
  while [ $i -lt 50 ]; do
    n=$((n + 1))
    # headers | key | value
    line="Idempotency-Key:evt-$n|ord-$((n % 500))|{\"id\":\"ord-$((n % 500))\",\"ver\":$n,\"qty\":$((n % 9 + 1))}"
    echo "$line"
    if [ $((n % 5)) -eq 0 ]; then echo "$line"; fi
    i=$((i + 1))
  done
  sleep 1
done | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server kafka:9092 --topic orders.v1 \
  --property parse.key=true --property key.separator='|' \
  --property parse.headers=true --property headers.delimiter='|' \
  --property headers.separator=',' --property headers.key.separator=':'
