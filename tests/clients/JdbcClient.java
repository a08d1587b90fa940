// PgJDBC through podrouter in transaction mode: more clients than server connections, each
// using server-side prepared statements (prepareThreshold=1: named from the first run; PgJDBC
// names them S_1, S_2, ... per connection), batches (many Bind/Execute before one Sync),
// transactions with autocommit off, an error inside a transaction, a ResultSet fetched in
// chunks through a portal, and a statement cache small enough to evict. Exits non-zero with a message on the first wrong result.
//
//     java -cp /usr/share/java/postgresql.jar tests/clients/JdbcClient.java HOST:PORT/DB USER PASSWORD [CLIENTS]
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcClient {
    static String url;
    static Properties props = new Properties();

    static void check(String what, Object got, Object want) {
        if (!Objects.equals(got, want)) throw new AssertionError(what + ": got " + got + ", want " + want);
    }

    static void client(int i) throws SQLException {
        try (Connection c = DriverManager.getConnection(url, props)) {
            try (PreparedStatement get = c.prepareStatement("select v from kv where k = ?");
                 PreparedStatement sum = c.prepareStatement("select ?::int + ?::int")) {
                for (int j = 0; j < 40; j++) {
                    int k = 1 + (i * 7 + j) % 100;
                    get.setInt(1, k);
                    try (ResultSet r = get.executeQuery()) { r.next(); check("lookup", r.getString(1), "v" + k); }
                    sum.setInt(1, i); sum.setInt(2, j);
                    try (ResultSet r = sum.executeQuery()) { r.next(); check("sum", r.getInt(1), i + j); }
                }
            }
            try (PreparedStatement ins = c.prepareStatement("insert into log (client, n) values (?, ?)")) {
                for (int n = 0; n < 20; n++) { ins.setInt(1, i); ins.setInt(2, n); ins.addBatch(); }
                check("batch", ins.executeBatch().length, 20);
            }
            try (PreparedStatement cnt = c.prepareStatement("select count(*) from log where client = ?")) {
                cnt.setInt(1, i);
                try (ResultSet r = cnt.executeQuery()) { r.next(); check("batch rows", r.getLong(1), 20L); }
            }
            c.setAutoCommit(false);
            try (PreparedStatement bump = c.prepareStatement("update counters set n = n + 1 where id = ?");
                 PreparedStatement read = c.prepareStatement("select n from counters where id = ?")) {
                for (int j = 0; j < 10; j++) {
                    bump.setInt(1, i); bump.executeUpdate();
                    read.setInt(1, i);
                    try (ResultSet r = read.executeQuery()) { r.next(); check("in transaction", r.getInt(1), j + 1); }
                    c.commit();
                }
                bump.setInt(1, i); bump.executeUpdate();
                try (PreparedStatement div = c.prepareStatement("select 1 / ?::int")) {
                    div.setInt(1, 0);
                    div.executeQuery();
                    throw new AssertionError("division by zero was not reported");
                } catch (SQLException e) {
                    check("error code", e.getSQLState(), "22012");
                }
                c.rollback();
                read.setInt(1, i);
                try (ResultSet r = read.executeQuery()) { r.next(); check("after rollback", r.getInt(1), 10); }
                // A result fetched 7 rows at a time from a portal (needs a transaction).
                try (PreparedStatement all = c.prepareStatement("select k from kv where k <= ? order by k")) {
                    all.setFetchSize(7);
                    all.setInt(1, 30);
                    List<Integer> got = new ArrayList<>();
                    try (ResultSet r = all.executeQuery()) { while (r.next()) got.add(r.getInt(1)); }
                    List<Integer> want = new ArrayList<>();
                    for (int k = 1; k <= 30; k++) want.add(k);
                    check("fetch size", got, want);
                }
                c.commit();
            }
        }
        // A statement cache smaller than the statements in use: PgJDBC closes the server
        // statements it evicts (Close messages sent with the next query).
        Properties small = new Properties();
        small.putAll(props);
        small.setProperty("preparedStatementCacheQueries", "2");
        try (Connection c = DriverManager.getConnection(url, small)) {
            for (int j = 0; j < 40; j++) {
                int n = j % 5;
                try (PreparedStatement p = c.prepareStatement("select ?::int * " + (n + 2))) {
                    p.setInt(1, j);
                    try (ResultSet r = p.executeQuery()) { r.next(); check("evicting", r.getInt(1), j * (n + 2)); }
                }
            }
        }
    }

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + args[0];
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("prepareThreshold", "1");
        int clients = args.length > 3 ? Integer.parseInt(args[3]) : 6;
        try (Connection s = DriverManager.getConnection(url, props); Statement st = s.createStatement()) {
            st.execute("drop table if exists kv, log, counters");
            st.execute("create table kv (k int primary key, v text)");
            st.execute("insert into kv select g, 'v' || g from generate_series(1, 100) g");
            st.execute("create table log (client int, n int)");
            st.execute("create table counters (id int primary key, n int not null default 0)");
            st.execute("insert into counters select g, 0 from generate_series(0, " + clients + ") g");
        }
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<?>> all = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            all.add(pool.submit(() -> { client(id); return null; }));
        }
        List<String> failures = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            try { all.get(i).get(); } catch (ExecutionException e) { failures.add("client " + i + ": " + e.getCause()); }
        }
        pool.shutdown();
        if (!failures.isEmpty()) {
            System.err.println("PgJDBC through podrouter:\n" + String.join("\n", failures));
            System.exit(1);
        }
        System.out.println("PgJDBC " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ": " + clients + " clients ok");
    }
}
