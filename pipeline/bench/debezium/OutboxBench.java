/*
 * The Debezium side of `pipeline bench relay --vs debezium` (driven by pipeline/bench/debezium.py).
 *
 * Debezium's embedded engine streams the outbox table over pgoutput, the outbox EventRouter SMT
 * turns each inserted row into an event record, and a KafkaProducer of our own publishes it,
 * modelled on Debezium Server's Kafka sink: every record of a batch is sent, then the batch waits
 * for all acknowledgements, and only then are the records marked processed and the batch finished
 * (so offsets, and the slot's confirmed LSN, never run ahead of Kafka).
 *
 * The records are taken in the Connect format (SourceRecord, no converter): the EventRouter's
 * key is the aggregate id and its value the payload column as the JSON text PostgreSQL stored, and
 * both are written as their UTF-8 bytes; Connect headers are written as their text. That is what a
 * Kafka Connect worker with StringConverter and the default SimpleHeaderConverter would put on the
 * wire, and avoids the Json format's second encoding of a JSON string ("\"{...}\"").
 *
 * Usage: java -cp <classes>:<libs>/* OutboxBench <config.properties>
 *   keys "kafka.*"    Kafka client properties for the producer and the admin client
 *   keys "producer.*" producer properties only
 *   keys "bench.*"    this harness: bench.topics (comma-separated, created up front),
 *                     bench.topic.partitions, bench.topic.replication (-1: the broker's default),
 *                     bench.payload.column (named in the error for a row without a payload)
 *   other keys        the Debezium engine and connector configuration, as given
 *
 * Protocol: stdout lines beginning with "BENCH " are for the Python side (anything else on stdout
 * is ignored by it; logs go to log4j2's file):
 *   BENCH TOPICS                     the up-front topics exist and the producer knows them
 *   BENCH POLLING                    the engine started its task (the slot exists) and polls
 *   BENCH ACKED <count>              progress, at most once a second, when the count changed
 *   BENCH REACHED <count> <epoch_us> <count> records acknowledged; when the last of them was
 *   BENCH FAILED <message>           the engine or the producer failed; the process exits 2
 *   BENCH STOPPED <count>            stopped cleanly after <count> acknowledgements
 *   BENCH TRACKING <count>           from now on each acknowledgement is kept with its event id
 *                                    (<count>: acknowledgements so far)
 *   BENCH UNTRACKED                  no longer kept
 *   BENCH DUMPED <n> <count>         <n> kept acknowledgements written to the file (and
 *                                    forgotten here); <count> acknowledgements in all
 * stdin lines: "WAIT <count>" (report REACHED once <count> records in all are acknowledged),
 * "TRACK" (keep, from now on, each record's event id with the time of its acknowledgement;
 * forgets what was kept before), "UNTRACK", "DUMP <path>" (write what was kept since TRACK or the
 * last DUMP to <path> as lines "ACK <event_id> <epoch_us>", in acknowledgement order), "STOP"
 * (or end of input: stop the engine, close the producer, exit 0).
 *
 * The event id is the record's "id" header, which the EventRouter sets from the outbox row's
 * event_id column (transforms.outbox.table.field.event.id); the time is read in the producer's
 * callback for that record (Kafka acknowledged it), as epoch microseconds of the wall clock.
 * Acknowledgements are kept in memory and written out only on DUMP, so that a latency run's
 * measured interval carries no extra output.
 */

import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.FileInputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;

import io.debezium.embedded.Connect;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;

public final class OutboxBench {

    private static final PrintStream OUT = System.out;

    private final AtomicLong acked = new AtomicLong();
    private volatile long target = Long.MAX_VALUE;
    private volatile long lastAckMicros;
    private final AtomicLong reachedMicros = new AtomicLong(-1);
    private final AtomicReference<String> failure = new AtomicReference<>();
    private final AtomicBoolean stopping = new AtomicBoolean();
    private final CountDownLatch finished = new CountDownLatch(1);
    private final Set<String> knownTopics = ConcurrentHashMap.newKeySet();
    /** One acknowledged record: its event id and when Kafka acknowledged it. */
    private record Ack(String eventId, long micros) {
    }

    /** Where acknowledgements are kept while tracking (TRACK ... DUMP); null: not tracking. */
    private volatile ConcurrentLinkedQueue<Ack> tracked;

    private final KafkaProducer<byte[], byte[]> producer;
    private final Admin admin;
    private final int partitions;
    private final short replication;
    private final String payloadColumn;

    private OutboxBench(Properties kafka, Properties producerOnly, Properties bench) {
        Properties p = new Properties();
        p.putAll(kafka);
        p.putAll(producerOnly);
        this.producer = new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer());
        this.admin = Admin.create(kafka);
        this.partitions = Integer.parseInt(bench.getProperty("bench.topic.partitions", "6"));
        this.replication = Short.parseShort(bench.getProperty("bench.topic.replication", "-1"));
        this.payloadColumn = bench.getProperty("bench.payload.column", "payload");
    }

    static synchronized void say(String line) {
        OUT.println("BENCH " + line);
        OUT.flush();
    }

    static long nowMicros() {
        Instant now = Instant.now();
        return now.getEpochSecond() * 1_000_000L + now.getNano() / 1_000;
    }

    /** Creates the topic (once per name) so that the first record does not wait for auto-creation
     * and the partition count is the one the project's relay would use. */
    void ensureTopic(String topic) throws InterruptedException {
        if (knownTopics.contains(topic)) {
            return;
        }
        NewTopic nt = new NewTopic(topic, Optional.of(partitions),
                replication < 0 ? Optional.empty() : Optional.of(replication));
        try {
            admin.createTopics(List.of(nt)).all().get(60, TimeUnit.SECONDS);
        }
        catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw new IllegalStateException("cannot create topic " + topic + ": " + e.getCause(), e.getCause());
            }
        }
        catch (java.util.concurrent.TimeoutException e) {
            throw new IllegalStateException("creating topic " + topic + " took over 60 s", e);
        }
        producer.partitionsFor(topic); // metadata now, not on the first send
        knownTopics.add(topic);
    }

    private static byte[] bytes(Object o) {
        if (o == null) {
            return null;
        }
        if (o instanceof byte[] b) {
            return b;
        }
        if (o instanceof java.nio.ByteBuffer bb) {
            byte[] b = new byte[bb.remaining()];
            bb.duplicate().get(b);
            return b;
        }
        return o.toString().getBytes(StandardCharsets.UTF_8);
    }

    private void acknowledged(RecordMetadata md, Exception error, String eventId) {
        if (error != null) {
            failure.compareAndSet(null, "Kafka did not acknowledge a record: " + error);
            return;
        }
        long now = nowMicros();
        lastAckMicros = now;
        ConcurrentLinkedQueue<Ack> keep = tracked;
        if (keep != null && eventId != null) {
            keep.add(new Ack(eventId, now));
        }
        if (acked.incrementAndGet() == target) {
            reachedMicros.compareAndSet(-1, now);
        }
    }

    /** The event id the EventRouter put in the record's "id" header (the row's event_id). */
    private static String eventId(SourceRecord r) {
        Header id = r.headers().lastWithName("id");
        if (id == null || id.value() == null) {
            return null;
        }
        Object v = id.value();
        return v instanceof byte[] b ? new String(b, StandardCharsets.UTF_8) : v.toString();
    }

    void track() {
        tracked = new ConcurrentLinkedQueue<>();
        say("TRACKING " + acked.get());
    }

    void untrack() {
        tracked = null;
        say("UNTRACKED");
    }

    /** Writes the acknowledgements kept so far as "ACK <event_id> <epoch_us>" lines and forgets
     * them; tracking goes on. */
    void dump(String path) {
        ConcurrentLinkedQueue<Ack> keep = tracked;
        long n = 0;
        try (BufferedWriter w = Files.newBufferedWriter(Path.of(path), StandardCharsets.UTF_8)) {
            if (keep != null) {
                Ack a;
                while ((a = keep.poll()) != null) {
                    w.write("ACK " + a.eventId() + " " + a.micros() + "\n");
                    n++;
                }
            }
        }
        catch (java.io.IOException e) {
            failure.compareAndSet(null, "cannot write the acknowledgements to " + path + ": " + e);
            return;
        }
        say("DUMPED " + n + " " + acked.get());
    }

    /** Debezium Server's Kafka sink, in short: send the batch, wait for every acknowledgement,
     * then mark each record processed and the batch finished. */
    void handleBatch(List<RecordChangeEvent<SourceRecord>> records,
                     DebeziumEngine.RecordCommitter<RecordChangeEvent<SourceRecord>> committer)
            throws InterruptedException {
        List<Future<RecordMetadata>> sent = new ArrayList<>(records.size());
        for (RecordChangeEvent<SourceRecord> event : records) {
            SourceRecord r = event.record();
            // the EventRouter drops deletes and tombstones before they get here; what is left is
            // one record per inserted row, its value the payload column (text or bytes)
            Object value = r.value();
            if (!(value instanceof String || value instanceof byte[]
                    || value instanceof java.nio.ByteBuffer)) {
                Header pos = r.headers().lastWithName("erp_outbox_position");
                String why = "outbox row " + (pos != null ? pos.value() : "?") + " has "
                        + (value == null ? "no " + payloadColumn + " (NULL)"
                                : "a " + payloadColumn + " of type " + value.getClass().getName())
                        + ": the run publishes that column as the record's value";
                failure.compareAndSet(null, why);
                throw new IllegalStateException(why);
            }
            ensureTopic(r.topic());
            List<org.apache.kafka.common.header.Header> headers = new ArrayList<>();
            for (Header h : r.headers()) {
                headers.add(new RecordHeader(h.key(), bytes(h.value())));
            }
            String id = eventId(r);
            sent.add(producer.send(
                    new ProducerRecord<>(r.topic(), null, null, bytes(r.key()), bytes(value), headers),
                    (md, error) -> acknowledged(md, error, id)));
        }
        for (Future<RecordMetadata> f : sent) {
            try {
                f.get();
            }
            catch (ExecutionException e) {
                String why = "Kafka did not acknowledge a record: " + e.getCause();
                failure.compareAndSet(null, why);
                throw new IllegalStateException(why, e.getCause());
            }
        }
        for (RecordChangeEvent<SourceRecord> event : records) {
            committer.markProcessed(event);
        }
        committer.markBatchFinished();
    }

    private void monitor() {
        long reported = -1;
        long lastProgress = 0;
        long waitingFor = -1;
        while (finished.getCount() > 0) {
            String why = failure.get();
            if (why != null && !stopping.get()) {
                say("FAILED " + why.replace('\n', ' '));
                OUT.flush();
                Runtime.getRuntime().halt(2);
            }
            long t = target;
            if (t != Long.MAX_VALUE && t != waitingFor && acked.get() >= t) {
                long at = reachedMicros.get();
                say("REACHED " + t + " " + (at >= 0 ? at : lastAckMicros));
                waitingFor = t;
            }
            long now = System.currentTimeMillis();
            long c = acked.get();
            if (c != reported && now - lastProgress >= 1000) {
                say("ACKED " + c);
                reported = c;
                lastProgress = now;
            }
            try {
                Thread.sleep(2);
            }
            catch (InterruptedException e) {
                return;
            }
        }
    }

    private void setTarget(long n) {
        reachedMicros.set(-1);
        target = n;
        // the count may have passed n before the target was known: the callback never saw
        // `== n`, and the monitor reports the last acknowledgement's time instead
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: OutboxBench <config.properties>");
            System.exit(64);
        }
        Properties all = new Properties();
        try (InputStreamReader in = new InputStreamReader(new FileInputStream(args[0]), StandardCharsets.UTF_8)) {
            all.load(in);
        }
        Properties kafka = new Properties();
        Properties producerOnly = new Properties();
        Properties bench = new Properties();
        Properties engineConfig = new Properties();
        for (Map.Entry<Object, Object> e : all.entrySet()) {
            String k = (String) e.getKey();
            String v = (String) e.getValue();
            if (k.startsWith("kafka.")) {
                kafka.setProperty(k.substring(6), v);
            }
            else if (k.startsWith("producer.")) {
                producerOnly.setProperty(k.substring(9), v);
            }
            else if (k.startsWith("bench.")) {
                bench.setProperty(k, v);
            }
            else {
                engineConfig.setProperty(k, v);
            }
        }

        OutboxBench b;
        try {
            b = new OutboxBench(kafka, producerOnly, bench);
            for (String topic : bench.getProperty("bench.topics", "").split(",")) {
                if (!topic.isBlank()) {
                    b.ensureTopic(topic.trim());
                }
            }
        }
        catch (Exception e) {
            say("FAILED Kafka at " + kafka.getProperty("bootstrap.servers") + ": " + e);
            System.exit(2);
            return;
        }
        say("TOPICS");

        DebeziumEngine<RecordChangeEvent<SourceRecord>> engine = DebeziumEngine
                .create(ChangeEventFormat.of(Connect.class))
                .using(engineConfig)
                .using(new DebeziumEngine.ConnectorCallback() {
                    @Override
                    public void pollingStarted() {
                        say("POLLING");
                    }
                })
                .using((success, message, error) -> {
                    if (!success && !b.stopping.get()) {
                        String why = message + (error != null ? ": " + error : "");
                        b.failure.compareAndSet(null, "Debezium engine stopped: " + why);
                    }
                    b.finished.countDown();
                })
                .notifying(b::handleBatch)
                .build();

        ExecutorService runner = Executors.newSingleThreadExecutor(r -> {
            Thread t = new Thread(r, "debezium-engine");
            t.setDaemon(true);
            return t;
        });
        runner.execute(engine);
        Thread mon = new Thread(b::monitor, "bench-monitor");
        mon.setDaemon(true);
        mon.start();

        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = stdin.readLine()) != null) {
            line = line.trim();
            if (line.startsWith("WAIT ")) {
                b.setTarget(Long.parseLong(line.substring(5).trim()));
            }
            else if (line.equals("TRACK")) {
                b.track();
            }
            else if (line.equals("UNTRACK")) {
                b.untrack();
            }
            else if (line.startsWith("DUMP ")) {
                b.dump(line.substring(5).trim());
            }
            else if (line.equals("STOP")) {
                break;
            }
        }

        // stop: the engine first (its task stops streaming, commits offsets and, with
        // slot.drop.on.stop, drops the slot), then the producer
        b.stopping.set(true);
        long deadline = System.currentTimeMillis() + 60_000;
        while (true) {
            try {
                engine.close();
                break;
            }
            catch (IllegalStateException e) {
                // "Cannot stop engine while tasks are starting": wait until they have started;
                // "already shut down" / "being shut down": nothing left to do
                String m = String.valueOf(e.getMessage());
                if (!m.contains("starting") || System.currentTimeMillis() > deadline) {
                    break;
                }
                Thread.sleep(200);
            }
        }
        b.finished.await(60, TimeUnit.SECONDS);
        runner.shutdown();
        runner.awaitTermination(30, TimeUnit.SECONDS);
        b.producer.close(java.time.Duration.ofSeconds(30));
        b.admin.close(java.time.Duration.ofSeconds(10));
        say("STOPPED " + b.acked.get());
        System.exit(0);
    }
}
