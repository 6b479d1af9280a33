import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * Readiness proof for the test Kafka started by scripts/services.sh.
 *
 * <p>Ready means a client can do what quotaflow's tests do: the cluster
 * answers metadata requests, a topic can be created and gets a leader, a
 * record can be produced with acks=all, and a consumer group (which needs the
 * group coordinator and __consumer_offsets) can read it back and commit.
 * Each step is retried until the deadline, so this can start together with
 * the broker; with a broker pid it gives up as soon as that process is gone.
 *
 * <p>Usage: KafkaReady BOOTSTRAP TIMEOUT_SECONDS [BROKER_PID]
 * Exit 0 when ready; 1 on timeout; 2 when the broker process died.
 */
public final class KafkaReady {
    private static final String TOPIC = "quotaflow-ready";
    private static final String GROUP = "quotaflow-ready";

    public static void main(String[] args) throws InterruptedException {
        if (args.length < 2) {
            System.err.println("usage: KafkaReady BOOTSTRAP TIMEOUT_SECONDS [BROKER_PID]");
            System.exit(64);
        }
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        long pid = args.length > 2 ? Long.parseLong(args[2]) : -1;
        watch(pid, deadline);

        String lastError = null;
        int attempt = 0;
        while (true) {
            attempt++;
            try {
                check(bootstrap, deadline);
                System.err.println("kafka-ready: " + bootstrap + " ready (attempt " + attempt + ")");
                System.exit(0);
            } catch (Exception e) {
                String msg = describe(e);
                if (!msg.equals(lastError)) {
                    System.err.println("kafka-ready: not ready yet: " + msg);
                    lastError = msg;
                }
            }
            if (System.nanoTime() > deadline) {
                System.err.println("kafka-ready: timed out; last error: " + lastError);
                System.exit(1);
            }
            Thread.sleep(500);
        }
    }

    /**
     * Exits with 2 as soon as the broker process (if given) is gone or a
     * zombie, and with 1 when the deadline passes, even inside a client call.
     */
    private static void watch(long pid, long deadline) {
        Thread t = new Thread(() -> {
            Path stat = Path.of("/proc/" + pid + "/stat");
            while (true) {
                if (System.nanoTime() > deadline + TimeUnit.SECONDS.toNanos(1)) {
                    System.err.println("kafka-ready: timed out");
                    Runtime.getRuntime().halt(1);
                }
                boolean alive = pid <= 0 || ProcessHandle.of(pid).map(ProcessHandle::isAlive).orElse(false);
                if (pid > 0 && alive && Files.isReadable(stat)) {
                    try {
                        String s = Files.readString(stat);
                        int i = s.lastIndexOf(')');
                        char state = i >= 0 && i + 2 < s.length() ? s.charAt(i + 2) : '?';
                        alive = state != 'Z' && state != 'X';
                    } catch (IOException e) {
                        alive = false;
                    }
                }
                if (!alive) {
                    System.err.println("kafka-ready: broker process " + pid + " exited");
                    Runtime.getRuntime().halt(2);
                }
                try {
                    Thread.sleep(200);
                } catch (InterruptedException e) {
                    return;
                }
            }
        }, "broker-watch");
        t.setDaemon(true);
        t.start();
    }

    private static long remainingMs(long deadline) {
        return Math.max(1000, TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime()));
    }

    private static void check(String bootstrap, long deadline) throws Exception {
        int stepMs = (int) Math.min(15_000, remainingMs(deadline));

        Properties ap = new Properties();
        ap.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        ap.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, stepMs);
        ap.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, stepMs);
        ap.put(AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, 50);
        ap.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, 250);
        ap.put(AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, 50);
        ap.put(AdminClientConfig.RETRY_BACKOFF_MAX_MS_CONFIG, 250);
        try (Admin admin = Admin.create(ap)) {
            if (admin.describeCluster().nodes().get(stepMs, TimeUnit.MILLISECONDS).isEmpty()) {
                throw new IllegalStateException("cluster has no brokers yet");
            }
            try {
                admin.createTopics(List.of(new NewTopic(TOPIC, 1, (short) 1)))
                        .all().get(stepMs, TimeUnit.MILLISECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) {
                    throw e;
                }
            }
            TopicDescription d = admin.describeTopics(List.of(TOPIC)).allTopicNames()
                    .get(stepMs, TimeUnit.MILLISECONDS).get(TOPIC);
            for (TopicPartitionInfo p : d.partitions()) {
                if (p.leader() == null || p.leader().isEmpty()) {
                    throw new IllegalStateException("partition " + p.partition() + " of " + TOPIC + " has no leader yet");
                }
            }
        }

        String nonce = UUID.randomUUID().toString();
        Properties pp = new Properties();
        pp.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        pp.put(ProducerConfig.ACKS_CONFIG, "all");
        pp.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, stepMs);
        pp.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, Math.min(stepMs, 5000));
        pp.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Math.max(stepMs, 5000 + 100));
        pp.put(ProducerConfig.LINGER_MS_CONFIG, 0);
        pp.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        pp.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        RecordMetadata meta;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
            meta = producer.send(new ProducerRecord<>(TOPIC, "ready", nonce))
                    .get(stepMs, TimeUnit.MILLISECONDS);
        }

        Properties cp = new Properties();
        cp.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        cp.put(ConsumerConfig.GROUP_ID_CONFIG, GROUP);
        cp.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        cp.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        cp.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        cp.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp)) {
            consumer.subscribe(Collections.singletonList(TOPIC));
            long until = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(stepMs);
            while (System.nanoTime() < until) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                    if (nonce.equals(r.value())) {
                        consumer.commitSync(Duration.ofMillis(stepMs));
                        return;
                    }
                }
            }
            throw new IllegalStateException("consumer group " + GROUP + " did not read back the record produced at "
                    + TOPIC + "-" + meta.partition() + "@" + meta.offset() + " within " + stepMs + " ms");
        }
    }

    private static String describe(Throwable e) {
        Throwable t = e;
        while ((t instanceof ExecutionException || t.getMessage() == null) && t.getCause() != null) {
            t = t.getCause();
        }
        return t.getClass().getSimpleName() + ": " + t.getMessage();
    }

    private KafkaReady() {}
}
