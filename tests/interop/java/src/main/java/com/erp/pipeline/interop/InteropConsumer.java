package com.erp.pipeline.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import com.fasterxml.jackson.databind.util.RawValue;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.OffsetDateTime;
import java.time.format.DateTimeParseException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.stream.Stream;
import org.apache.avro.Conversions;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.data.TimeConversions;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.SchemaStore;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.utils.Utils;

/**
 * Reads the pipeline's event topics with nothing but kafka-clients and Apache Avro, as a data
 * team's Java, Spark or Flink job would, and checks the contract of every record:
 *
 * <ol>
 *   <li>its partition is the one Java's default partitioner picks for its key
 *       ({@code toPositive(murmur2(key)) % partitions});
 *   <li>its value decodes: single-object encoding ({@code C3 01} + CRC-64-AVRO fingerprint) with
 *       {@link BinaryMessageDecoder} over a {@link SchemaStore.Cache} of every schema under the
 *       schemas directory, or the Confluent framing ({@code 00} + schema id) with the schema
 *       fetched from the registry's REST API; the writer schema is the one of {@code ce_type};
 *   <li>its CloudEvents binary-mode headers are present, {@code ce_specversion} is 1.0,
 *       {@code ce_subject} equals the key and {@code ce_time} is RFC 3339.
 * </ol>
 *
 * <p>Prints one JSON line per record and a summary line on stdout; exits 1 on the first
 * violation (the message on stderr) and 2 on bad arguments.
 *
 * <pre>
 * java -cp ... com.erp.pipeline.interop.InteropConsumer --bootstrap HOST:PORT
 *     --topics T1,T2 --expected N --schemas DIR [--registry URL] [--timeout-s 60]
 * </pre>
 */
public final class InteropConsumer {

  static final String[] REQUIRED_HEADERS = {
    "ce_specversion", "ce_id", "ce_type", "ce_source", "ce_subject", "ce_time", "content-type"
  };

  /** A broken contract: the message says which record and what disagreed. */
  static final class Violation extends Exception {
    Violation(String message) {
      super(message);
    }
  }

  private static final ObjectMapper JSON = new ObjectMapper();

  private final GenericData model = new GenericData();
  private final SchemaStore.Cache store = new SchemaStore.Cache();
  private final BinaryMessageDecoder<GenericRecord> singleObject;
  /** fingerprint → "event_type/vN.avsc"; event type → the full names of its schemas. */
  private final Map<Long, String> fileByFingerprint = new HashMap<>();
  private final Map<String, List<Schema>> schemasByType = new TreeMap<>();
  private final String registryUrl;
  private final HttpClient http;
  private final Map<Integer, Schema> registrySchemas = new HashMap<>();
  private final Map<Integer, GenericDatumReader<GenericRecord>> registryReaders = new HashMap<>();

  InteropConsumer(Path schemasDir, String registryUrl) throws IOException {
    model.addLogicalTypeConversion(new Conversions.DecimalConversion());
    model.addLogicalTypeConversion(new TimeConversions.TimestampMicrosConversion());
    model.addLogicalTypeConversion(new TimeConversions.TimestampMillisConversion());
    model.addLogicalTypeConversion(new TimeConversions.DateConversion());
    loadSchemas(schemasDir);
    // readSchema null: every record is read with its own writer schema, found by fingerprint
    singleObject = new BinaryMessageDecoder<>(model, null, store);
    this.registryUrl = registryUrl == null ? null : registryUrl.replaceAll("/+$", "");
    this.http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
  }

  private void loadSchemas(Path dir) throws IOException {
    List<Path> files;
    try (Stream<Path> walk = Files.walk(dir)) {
      files = walk.filter(p -> p.toString().endsWith(".avsc")).sorted().toList();
    }
    if (files.isEmpty()) {
      throw new IOException("no *.avsc under " + dir);
    }
    for (Path file : files) {
      // one parser per file: the files define their named types independently
      Schema schema = new Schema.Parser().parse(file.toFile());
      long fp = SchemaNormalization.parsingFingerprint64(schema);
      String eventType = dir.relativize(file).getParent().toString();
      store.addSchema(schema);
      fileByFingerprint.put(fp, eventType + "/" + file.getFileName());
      schemasByType.computeIfAbsent(eventType, k -> new ArrayList<>()).add(schema);
    }
  }

  /** The decoded value of one record, and how it was framed. */
  record Decoded(GenericRecord datum, String wireForm, String schemaRef, boolean reencodesSame) {}

  Decoded decode(byte[] value, String ceType, String where) throws Violation {
    if (value == null || value.length < 2) {
      throw new Violation(where + ": value is null or shorter than any Avro framing");
    }
    List<Schema> expected = schemasByType.get(ceType);
    if (expected == null) {
      throw new Violation(where + ": ce_type " + ceType + " has no schema under the schemas "
          + "directory (known: " + schemasByType.keySet() + ")");
    }
    if ((value[0] & 0xff) == 0xC3 && (value[1] & 0xff) == 0x01) {
      if (value.length < 10) {
        throw new Violation(where + ": single-object header without a full fingerprint");
      }
      long fp = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
      GenericRecord datum;
      try {
        datum = singleObject.decode(value);
      } catch (IOException | RuntimeException e) {
        throw new Violation(where + ": BinaryMessageDecoder failed for fingerprint "
            + String.format("%016x", fp) + " (" + e + "); Java's CRC-64-AVRO fingerprints of "
            + "the catalogue: " + fingerprints());
      }
      String file = fileByFingerprint.get(fp);
      checkWriter(datum.getSchema(), expected, ceType, where, file);
      boolean same;
      try {
        ByteBuffer again = new BinaryMessageEncoder<GenericRecord>(model, datum.getSchema())
            .encode(datum);
        same = Arrays.equals(toArray(again), value);
      } catch (IOException e) {
        throw new Violation(where + ": re-encoding the decoded record failed: " + e);
      }
      return new Decoded(datum, "single-object", file, same);
    }
    if (value[0] == 0) {
      if (registryUrl == null) {
        throw new Violation(where + ": Confluent-framed record (magic 0) but no --registry");
      }
      if (value.length < 5) {
        throw new Violation(where + ": Confluent framing without a full schema id");
      }
      int id = ByteBuffer.wrap(value, 1, 4).getInt();
      Schema writer = registrySchema(id, where);
      checkWriter(writer, expected, ceType, where, "registry id " + id);
      GenericRecord datum;
      BinaryDecoder in = DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, null);
      try {
        datum = registryReaders.get(id).read(null, in);
        if (!in.isEnd()) {
          throw new Violation(where + ": bytes left over after the record (schema id " + id
              + ")");
        }
      } catch (IOException | RuntimeException e) {
        throw new Violation(where + ": decoding with registry schema id " + id + " failed: "
            + e);
      }
      boolean same;
      try {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        out.write(value, 0, 5);
        BinaryEncoder enc =
            EncoderFactory.get().binaryEncoder(out, null);
        new GenericDatumWriter<GenericRecord>(writer, model)
            .write(datum, enc);
        enc.flush();
        same = Arrays.equals(out.toByteArray(), value);
      } catch (IOException e) {
        throw new Violation(where + ": re-encoding the decoded record failed: " + e);
      }
      return new Decoded(datum, "confluent", "registry id " + id, same);
    }
    throw new Violation(where + ": value starts with " + String.format("%02x%02x", value[0],
        value[1]) + ": neither single-object (c301) nor Confluent (00) framing");
  }

  private void checkWriter(Schema writer, List<Schema> expected, String ceType, String where,
      String ref) throws Violation {
    long fp = SchemaNormalization.parsingFingerprint64(writer);
    for (Schema s : expected) {
      if (SchemaNormalization.parsingFingerprint64(s) == fp) {
        return;
      }
    }
    throw new Violation(where + ": writer schema " + writer.getFullName() + " (" + ref
        + ", fingerprint " + String.format("%016x", fp) + ") is not a schema of ce_type "
        + ceType);
  }

  private String fingerprints() {
    StringBuilder sb = new StringBuilder();
    new TreeMap<>(fileByFingerprint).forEach((fp, file) ->
        sb.append(file).append('=').append(String.format("%016x", fp)).append(' '));
    return sb.toString().trim();
  }

  private Schema registrySchema(int id, String where) throws Violation {
    Schema cached = registrySchemas.get(id);
    if (cached != null) {
      return cached;
    }
    URI uri = URI.create(registryUrl + "/schemas/ids/" + id);
    HttpResponse<String> resp;
    try {
      resp = http.send(HttpRequest.newBuilder(uri).timeout(Duration.ofSeconds(10))
          .header("Accept", "application/vnd.schemaregistry.v1+json").GET().build(),
          HttpResponse.BodyHandlers.ofString());
    } catch (IOException e) {
      throw new Violation(where + ": GET " + uri + " failed: " + e);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new Violation(where + ": interrupted during GET " + uri);
    }
    if (resp.statusCode() != 200) {
      throw new Violation(where + ": GET " + uri + " answered " + resp.statusCode() + ": "
          + resp.body());
    }
    Schema schema;
    try {
      JsonNode body = JSON.readTree(resp.body());
      JsonNode type = body.get("schemaType");
      if (type != null && !"AVRO".equals(type.asText())) {
        throw new Violation(where + ": registry schema id " + id + " is " + type.asText());
      }
      schema = new Schema.Parser().parse(body.get("schema").asText());
    } catch (IOException | RuntimeException e) {
      throw new Violation(where + ": registry answer for id " + id + " is not an Avro schema: "
          + e);
    }
    registrySchemas.put(id, schema);
    registryReaders.put(id, new GenericDatumReader<>(schema, schema, model));
    return schema;
  }

  private static byte[] toArray(ByteBuffer buf) {
    byte[] out = new byte[buf.remaining()];
    buf.duplicate().get(out);
    return out;
  }

  static String header(ConsumerRecord<byte[], byte[]> rec, String name, String where)
      throws Violation {
    Header h = rec.headers().lastHeader(name);
    if (h == null || h.value() == null) {
      throw new Violation(where + ": header " + name + " is missing");
    }
    int count = 0;
    for (Header ignored : rec.headers().headers(name)) {
      count++;
    }
    if (count > 1) {
      throw new Violation(where + ": header " + name + " appears " + count + " times");
    }
    return new String(h.value(), StandardCharsets.UTF_8);
  }

  /** Checks one record; returns its output line. */
  ObjectNode check(ConsumerRecord<byte[], byte[]> rec, int partitions) throws Violation {
    String where = rec.topic() + "-" + rec.partition() + "@" + rec.offset();
    byte[] keyBytes = rec.key();
    if (keyBytes == null) {
      throw new Violation(where + ": record has no key");
    }
    String key = new String(keyBytes, StandardCharsets.UTF_8);
    int javaPartition = Utils.toPositive(Utils.murmur2(keyBytes)) % partitions;
    if (javaPartition != rec.partition()) {
      throw new Violation(where + ": key " + key + " is in partition " + rec.partition()
          + " but Java's default partitioner (toPositive(murmur2(key)) % " + partitions
          + ") puts it in partition " + javaPartition);
    }
    Map<String, String> ce = new LinkedHashMap<>();
    for (String name : REQUIRED_HEADERS) {
      ce.put(name, header(rec, name, where));
    }
    if (!"1.0".equals(ce.get("ce_specversion"))) {
      throw new Violation(where + ": ce_specversion is " + ce.get("ce_specversion")
          + ", expected 1.0");
    }
    if (!key.equals(ce.get("ce_subject"))) {
      throw new Violation(where + ": ce_subject " + ce.get("ce_subject")
          + " differs from the key " + key);
    }
    for (String name : new String[] {"ce_id", "ce_type", "ce_source", "content-type"}) {
      if (ce.get(name).isEmpty()) {
        throw new Violation(where + ": header " + name + " is empty");
      }
    }
    try {
      OffsetDateTime.parse(ce.get("ce_time"));
    } catch (DateTimeParseException e) {
      throw new Violation(where + ": ce_time " + ce.get("ce_time") + " is not RFC 3339: "
          + e.getMessage());
    }
    Decoded d = decode(rec.value(), ce.get("ce_type"), where);
    ObjectNode line = JSON.createObjectNode();
    line.put("topic", rec.topic());
    line.put("partition", rec.partition());
    line.put("offset", rec.offset());
    line.put("key", key);
    line.put("ce_id", ce.get("ce_id"));
    line.put("ce_type", ce.get("ce_type"));
    line.put("ce_source", ce.get("ce_source"));
    line.put("ce_time", ce.get("ce_time"));
    line.put("content_type", ce.get("content-type"));
    line.put("wire_form", d.wireForm());
    line.put("schema", d.datum().getSchema().getFullName());
    line.put("schema_ref", d.schemaRef());
    line.put("reencodes_identically", d.reencodesSame());
    // GenericData's JSON rendering (decimals as BigDecimal numbers, timestamps as ISO
    // instants), embedded as it is: re-parsing would turn 12.50 into a double
    String text = model.toString(d.datum());
    try {
      JSON.readTree(text);
    } catch (IOException e) {
      throw new Violation(where + ": GenericData.toString is not JSON: " + text);
    }
    line.putRawValue("record", new RawValue(text));
    return line;
  }

  public static void main(String[] argv) {
    System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
    System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
    Map<String, String> args;
    try {
      args = parseArgs(argv);
    } catch (IllegalArgumentException e) {
      System.err.println("usage error: " + e.getMessage());
      System.err.println("usage: InteropConsumer --bootstrap HOST:PORT --topics T1,T2 "
          + "--expected N --schemas DIR [--registry URL] [--timeout-s SECONDS]");
      System.exit(2);
      return;
    }
    try {
      run(args, System.out);
    } catch (Violation e) {
      System.out.flush();
      System.err.println("INTEROP FAILURE: " + e.getMessage());
      System.exit(1);
    } catch (Exception e) {
      System.out.flush();
      System.err.println("INTEROP ERROR: " + e);
      e.printStackTrace(System.err);
      System.exit(1);
    }
  }

  static Map<String, String> parseArgs(String[] argv) {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i < argv.length; i += 2) {
      if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
        throw new IllegalArgumentException("expected --name value pairs, got " + argv[i]);
      }
      args.put(argv[i].substring(2), argv[i + 1]);
    }
    for (String required : new String[] {"bootstrap", "topics", "expected", "schemas"}) {
      if (!args.containsKey(required)) {
        throw new IllegalArgumentException("--" + required + " is required");
      }
    }
    return args;
  }

  static void run(Map<String, String> args, PrintStream out) throws Exception {
    List<String> topics = Arrays.stream(args.get("topics").split(","))
        .map(String::trim).filter(t -> !t.isEmpty()).toList();
    long expected = Long.parseLong(args.get("expected"));
    long timeoutMs = (long) (Double.parseDouble(args.getOrDefault("timeout-s", "60")) * 1000);
    InteropConsumer checker = new InteropConsumer(Path.of(args.get("schemas")),
        args.get("registry"));

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, args.get("bootstrap"));
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    props.put(ConsumerConfig.CLIENT_ID_CONFIG, "erp-pipeline-java-interop");

    long deadline = System.currentTimeMillis() + timeoutMs;
    long count = 0;
    Map<String, Long> perTopic = new TreeMap<>();
    Map<String, Long> perType = new TreeMap<>();
    Map<String, Long> perWireForm = new TreeMap<>();
    long reencodedSame = 0;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      Map<String, Integer> partitions = new HashMap<>();
      List<TopicPartition> tps = new ArrayList<>();
      for (String topic : topics) {
        List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(30));
        if (infos == null || infos.isEmpty()) {
          throw new Violation("topic " + topic + " does not exist or has no partitions");
        }
        partitions.put(topic, infos.size());
        for (PartitionInfo p : infos) {
          tps.add(new TopicPartition(topic, p.partition()));
        }
      }
      consumer.assign(tps);
      consumer.seekToBeginning(tps);
      Map<TopicPartition, Long> end = new HashMap<>(
          consumer.endOffsets(tps, Duration.ofSeconds(30)));
      end.entrySet().removeIf(e -> consumer.position(e.getKey()) >= e.getValue());
      while (!end.isEmpty()) {
        if (System.currentTimeMillis() > deadline) {
          throw new Violation("timed out after " + timeoutMs + " ms with " + count
              + " records read; not yet at the end offsets of " + end);
        }
        ConsumerRecords<byte[], byte[]> batch = consumer.poll(Duration.ofMillis(500));
        for (ConsumerRecord<byte[], byte[]> rec : batch) {
          ObjectNode line = checker.check(rec, partitions.get(rec.topic()));
          out.println(JSON.writeValueAsString(line));
          count++;
          perTopic.merge(rec.topic(), 1L, Long::sum);
          perType.merge(line.get("ce_type").asText(), 1L, Long::sum);
          perWireForm.merge(line.get("wire_form").asText(), 1L, Long::sum);
          if (line.get("reencodes_identically").asBoolean()) {
            reencodedSame++;
          }
        }
        end.entrySet().removeIf(e -> consumer.position(e.getKey()) >= e.getValue());
      }
    }
    ObjectNode summary = JSON.createObjectNode();
    ObjectNode s = summary.putObject("summary");
    s.put("records", count);
    s.put("expected", expected);
    s.set("per_topic", JSON.valueToTree(perTopic));
    s.set("per_type", JSON.valueToTree(perType));
    s.set("per_wire_form", JSON.valueToTree(perWireForm));
    s.put("reencoded_identically", reencodedSame);
    s.put("java_fingerprints", checker.fingerprints());
    s.put("ok", count == expected);
    out.println(JSON.writeValueAsString(summary));
    out.flush();
    if (count != expected) {
      throw new Violation("read " + count + " records from " + topics + ", expected "
          + expected);
    }
  }
}
