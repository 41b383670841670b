package pulses.peer;

import com.fasterxml.jackson.annotation.JsonFormat;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.PropertyNamingStrategies;
import java.io.IOException;
import java.math.BigDecimal;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.LogAndContinueExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.KGroupedStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Named;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.kstream.Suppressed.BufferConfig;
import org.apache.kafka.streams.kstream.TimeWindows;
import org.apache.kafka.streams.kstream.Window;
import org.apache.kafka.streams.processor.TimestampExtractor;
import org.apache.kafka.streams.state.WindowStore;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Kafka Streams peer of the pulses benchmark: sums grouped pulses per (tenant, sku, unit)
 * in 10 s ("postflight") and 60 s ("minute") tumbling event-time windows, and writes one
 * final JSON record per (tenant, sku, unit) and window once the window has closed (its end
 * plus 5 s of grace). Like the Rust stage it is compared with, it aggregates in the input's
 * own partitioning (by tenant): one windowed aggregate per tenant, holding every sku|unit.
 */
public final class PeerKafkaStreams {
    private static final Logger LOG = LoggerFactory.getLogger(PeerKafkaStreams.class);
    private static final Duration GRACE = Duration.ofSeconds(5);

    /** One mapper for the input, the internal topics and the output: snake_case JSON. */
    static final ObjectMapper JSON = new ObjectMapper()
            .setPropertyNamingStrategy(PropertyNamingStrategies.SNAKE_CASE)
            .configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);

    /**
     * A grouped pulse as read from the input (object_id, pulse_id, attributes, source are
     * ignored). Jackson reads the decimal string "2352.17" or "6.51E-7" exactly (it calls
     * {@code new BigDecimal(text)}). A missing field fails deserialization, so the record is
     * logged and skipped.
     */
    record Pulse(String tenantId, String productSku, String useUnit,
                 @JsonFormat(shape = JsonFormat.Shape.STRING) BigDecimal usedAmount,
                 String eventTime) {
        Pulse {
            Objects.requireNonNull(tenantId, "tenant_id");
            Objects.requireNonNull(productSku, "product_sku");
            Objects.requireNonNull(useUnit, "use_unit");
            Objects.requireNonNull(usedAmount, "used_amount");
            Objects.requireNonNull(eventTime, "event_time");
        }
    }

    /** The running aggregate of one (sku, unit) in one tenant's window: exact sum, count, min, max. */
    static final class Agg {
        // sku and unit are kept here too, so the output does not have to split the "sku|unit" key.
        public String productSku, useUnit;
        @JsonFormat(shape = JsonFormat.Shape.STRING) public BigDecimal sum = BigDecimal.ZERO;
        public long count;
        @JsonFormat(shape = JsonFormat.Shape.STRING) public BigDecimal min, max;

        Agg add(Pulse p) {
            productSku = p.productSku();
            useUnit = p.useUnit();
            BigDecimal amount = p.usedAmount();
            sum = sum.add(amount); // BigDecimal addition is exact: no rounding, ever
            count++;
            min = min == null || amount.compareTo(min) < 0 ? amount : min;
            max = max == null || amount.compareTo(max) > 0 ? amount : max;
            return this;
        }

        Result result(String tenantId, String windowName, Window window) {
            return new Result(tenantId, productSku, useUnit, windowName, window.start(), window.end(),
                    sum.toPlainString(), count, min.toPlainString(), max.toPlainString());
        }
    }

    /**
     * The value of one tenant's window, kept in RocksDB (as one JSON object) and in the
     * suppression buffer: the aggregate of each "sku|unit" that had a pulse in the window,
     * sorted, so the finals of a window come out in a fixed order.
     */
    static final class Groups extends TreeMap<String, Agg> {
        Groups add(Pulse p) {
            computeIfAbsent(p.productSku() + "|" + p.useUnit(), skuUnit -> new Agg()).add(p);
            return this;
        }
    }

    /** The output record of one closed window (amounts as plain decimal strings). */
    record Result(String tenantId, String productSku, String useUnit, String window,
                  long windowStartMs, long windowEndMs, String totalAmount, long pulseCount,
                  String minAmount, String maxAmount) {}

    /** The record timestamp is when the pulse was grouped; windows use the pulse's event_time. */
    static final class EventTimeExtractor implements TimestampExtractor {
        @Override
        public long extract(ConsumerRecord<Object, Object> record, long partitionTime) {
            try {
                return Instant.parse(((Pulse) record.value()).eventTime()).toEpochMilli();
            } catch (RuntimeException e) {
                return -1; // Kafka Streams logs and drops records with a negative timestamp
            }
        }
    }

    static <T> Serde<T> json(Class<T> type) {
        return Serdes.serdeFrom(
                (topic, value) -> {
                    try {
                        return value == null ? null : JSON.writeValueAsBytes(value);
                    } catch (IOException e) {
                        throw new SerializationException(e);
                    }
                },
                (topic, bytes) -> {
                    try {
                        return bytes == null ? null : JSON.readValue(bytes, type);
                    } catch (IOException e) {
                        throw new SerializationException(e); // handled by LogAndContinue
                    }
                });
    }

    static final Serde<Pulse> PULSE = json(Pulse.class);
    static final Serde<Groups> GROUPS = json(Groups.class);
    static final Serde<Result> RESULT = json(Result.class);

    static Topology topology(String input, String output) {
        StreamsBuilder builder = new StreamsBuilder();
        KGroupedStream<String, Pulse> byTenant = builder
                .stream(input, Consumed.with(Serdes.String(), PULSE)
                        .withTimestampExtractor(new EventTimeExtractor()))
                // No repartition, as in the Rust stage: the input is already keyed and
                // partitioned by tenant_id (murmur2, Java's default partitioner), and the tenant
                // is a prefix of the group (tenant, sku, unit), so every group lives whole in one
                // input partition. Each task then aggregates one input partition, in the order its
                // records were written, and closes windows on that partition's own stream time.
                //
                // The textbook form, groupBy(tenant|sku|unit), re-keys through a repartition topic
                // that merges all input partitions, and a repartition task's stream time is the
                // largest timestamp it has seen from any of them. From a backlog preloaded into the
                // 6-partition input, partitions whose event time advances faster (fewer records per
                // second of event time) push it ahead, and the other partitions' records then reach
                // windows that have already closed: they are dropped ("Skipping record for expired
                // window"). Observed with 200k records (10 tenants x 4 skus) preloaded: 633 of the
                // 960 expected windows emitted, 183 of them with wrong totals.
                .groupByKey();
        finalWindows(byTenant, "postflight", Duration.ofSeconds(10), output);
        finalWindows(byTenant, "minute", Duration.ofSeconds(60), output);
        return builder.build();
    }

    static void finalWindows(KGroupedStream<String, Pulse> byTenant, String name, Duration size, String output) {
        byTenant.windowedBy(TimeWindows.ofSizeAndGrace(size, GRACE))
                // One aggregate per tenant and window, holding each sku|unit's Agg.
                .aggregate(Groups::new, (tenant, pulse, groups) -> groups.add(pulse), Named.as(name + "-aggregate"),
                        Materialized.<String, Groups, WindowStore<Bytes, byte[]>>as(name + "-store")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(GROUPS))
                // Final results only: hold each window until stream time passes its end plus
                // grace. Unbounded, because the buffer must never emit early or drop a window;
                // it is backed by a changelog topic, so it survives a restart.
                .suppress(Suppressed.untilWindowCloses(BufferConfig.unbounded()).withName(name + "-final"))
                .toStream(Named.as(name + "-finals"))
                // One output record per (tenant, sku, unit) of the closed window, keyed
                // tenant|sku|unit. The tenant is the record key (the input is keyed by tenant_id).
                .flatMap((windowed, groups) -> {
                    String tenant = windowed.key();
                    List<KeyValue<String, Result>> results = new ArrayList<>(groups.size());
                    groups.forEach((skuUnit, agg) -> results.add(KeyValue.pair(
                            tenant + "|" + skuUnit, agg.result(tenant, name, windowed.window()))));
                    return results;
                }, Named.as(name + "-results"))
                .to(output, Produced.with(Serdes.String(), RESULT).withName(name + "-output"));
    }

    public static void main(String[] args) throws InterruptedException {
        Map<String, String> opt = new HashMap<>(Map.of("--guarantee", StreamsConfig.EXACTLY_ONCE_V2));
        for (int i = 0; i + 1 < args.length; i += 2) {
            opt.put(args[i], args[i + 1]);
        }
        if (args.length % 2 != 0 || !opt.keySet().containsAll(List.of(
                "--bootstrap-servers", "--input", "--output", "--application-id", "--state-dir"))) {
            System.err.println("usage: java -jar peer-kafka-streams.jar --bootstrap-servers HOST:PORT --input TOPIC"
                    + " --output TOPIC --application-id ID --state-dir DIR [--guarantee exactly_once_v2|at_least_once]");
            System.exit(2);
        }

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, opt.get("--application-id"));
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, opt.get("--bootstrap-servers"));
        props.put(StreamsConfig.STATE_DIR_CONFIG, opt.get("--state-dir"));
        // exactly_once_v2 also lowers commit.interval.ms to 100 ms; everything else is left at
        // the defaults (RocksDB stores, 10 MB record cache), one thread for a 2-core machine.
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, opt.get("--guarantee"));
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        props.put(StreamsConfig.DESERIALIZATION_EXCEPTION_HANDLER_CLASS_CONFIG, LogAndContinueExceptionHandler.class);

        KafkaStreams streams = new KafkaStreams(topology(opt.get("--input"), opt.get("--output")), props);
        CountDownLatch failed = new CountDownLatch(1);
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING) {
                System.out.println("peer-kafka-streams: RUNNING");
                System.out.flush();
            } else if (now == KafkaStreams.State.ERROR) {
                failed.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            boolean closed = streams.close(Duration.ofSeconds(30));
            // A JVM stopped by SIGTERM exits with 143 unless a hook halts it with a status.
            Runtime.getRuntime().halt(closed ? 0 : 1);
        }, "peer-shutdown"));

        streams.start();
        failed.await(); // only a failure gets past here; SIGTERM exits through the hook
        LOG.error("Kafka Streams failed, exiting");
        streams.close(Duration.ofSeconds(30));
        Runtime.getRuntime().halt(1);
    }
}
