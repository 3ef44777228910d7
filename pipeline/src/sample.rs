//! `abridge sample`: a realistic synthetic ticket table, the same for the same seed.
//!
//! Tickets are drawn from scenarios of an IT help desk (hardware, network, accounts,
//! software, billing, security, email, printing), in English and Chinese, with a
//! reference summary a human agent could have written. Like real exports, a small share
//! of rows are re-sent duplicates or have an empty body, so that the pipeline's per-row
//! handling is exercised by the demo. The generator is a self-contained SplitMix64 so
//! that a seed gives the same table on every platform and every release.
//!
//! Past 800 lines because most of it is the scenarios' text, in two languages.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::PipelineError;

/// Rows per batch written.
const BATCH_ROWS: usize = 8192;
/// 2026-01-01T00:00:00Z in microseconds.
const START_MICROS: i64 = 1_767_225_600_000_000;
/// Tickets spread over 120 days.
const SPAN_MICROS: i64 = 120 * 86_400 * 1_000_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Number of rows.
    pub rows: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// Leave out duplicates and empty bodies.
    pub clean: bool,
}

/// The sample's schema: a help desk's export, deliberately not under abridge's column
/// names (`ticket_id`, `subject`, `body`, `opened_at`, `resolution_summary`).
pub fn sample_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ticket_id", DataType::Utf8, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("body", DataType::Utf8, true),
        Field::new("category", DataType::Utf8, false),
        Field::new("priority", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("language", DataType::Utf8, false),
        Field::new("customer", DataType::Utf8, false),
        Field::new(
            "opened_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("resolution_summary", DataType::Utf8, false),
    ]))
}

/// Writes the sample to `out` as Parquet.
pub fn write_sample(options: &SampleOptions, out: &Path) -> Result<(), PipelineError> {
    let io = |source| PipelineError::Io {
        path: out.to_path_buf(),
        source,
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    // Written beside the target and renamed, so an interrupted run leaves no half file.
    let temp = out.with_extension("parquet.inprogress");
    let file = File::create(&temp).map_err(io)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(BATCH_ROWS))
        .build();
    let mut writer = ArrowWriter::try_new(file, sample_schema(), Some(properties))?;
    let mut generator = Generator::new(options);
    let mut done = 0;
    while done < options.rows {
        let n = BATCH_ROWS.min(options.rows - done);
        writer.write(&generator.batch(n)?)?;
        done += n;
    }
    writer.close()?;
    std::fs::rename(&temp, out).map_err(io)
}

/// SplitMix64: tiny, fast, and fixed forever (unlike a crate's default generator).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, per_thousand: u64) -> bool {
        self.next() % 1000 < per_thousand
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

struct Generator {
    rng: SplitMix64,
    clean: bool,
    next_id: u64,
    recent: Vec<Ticket>,
}

#[derive(Clone)]
struct Ticket {
    id: String,
    subject: String,
    body: Option<String>,
    category: &'static str,
    priority: &'static str,
    status: &'static str,
    language: &'static str,
    customer: &'static str,
    opened_at: i64,
    reference: String,
}

impl Generator {
    fn new(options: &SampleOptions) -> Self {
        Self {
            rng: SplitMix64(options.seed ^ 0x6162_7269_6467_6521),
            clean: options.clean,
            next_id: 100_000,
            recent: Vec::new(),
        }
    }

    fn batch(&mut self, rows: usize) -> Result<RecordBatch, PipelineError> {
        let mut cols: Vec<StringBuilder> = (0..9).map(|_| StringBuilder::new()).collect();
        let mut opened = TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC");
        for _ in 0..rows {
            let t = self.ticket();
            cols[0].append_value(&t.id);
            cols[1].append_value(&t.subject);
            cols[2].append_option(t.body.as_deref());
            cols[3].append_value(t.category);
            cols[4].append_value(t.priority);
            cols[5].append_value(t.status);
            cols[6].append_value(t.language);
            cols[7].append_value(t.customer);
            cols[8].append_value(&t.reference);
            opened.append_value(t.opened_at);
        }
        let mut arrays: Vec<ArrayRef> = cols
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let reference = arrays.remove(8);
        arrays.push(Arc::new(opened.finish()));
        arrays.push(reference);
        Ok(RecordBatch::try_new(sample_schema(), arrays)?)
    }

    fn ticket(&mut self) -> Ticket {
        // About 1% of rows re-send a recent ticket, as overlapping exports do.
        if !self.clean && !self.recent.is_empty() && self.rng.chance(10) {
            let i = self.rng.below(self.recent.len());
            return self.recent[i].clone();
        }
        self.next_id += 1 + self.rng.below(3) as u64;
        let scenario = &SCENARIOS[self.rng.below(SCENARIOS.len())];
        let chinese = self.rng.chance(400);
        let slots = Slots::draw(&mut self.rng, chinese);
        let (subject, body, reference) = if chinese {
            scenario.zh.render(&mut self.rng, &slots, true)
        } else {
            scenario.en.render(&mut self.rng, &slots, false)
        };
        let body = if !self.clean && self.rng.chance(10) {
            if self.rng.chance(500) {
                None
            } else {
                Some(String::from(" "))
            }
        } else {
            Some(body)
        };
        let ticket = Ticket {
            id: format!("INC{:07}", self.next_id),
            subject,
            body,
            category: scenario.category,
            priority: self.rng.pick(&["P1", "P2", "P2", "P3", "P3", "P3", "P4"]),
            status: self
                .rng
                .pick(&["resolved", "resolved", "closed", "open", "pending"]),
            language: if chinese { "zh" } else { "en" },
            customer: slots.customer,
            opened_at: START_MICROS + (self.rng.next() % SPAN_MICROS as u64) as i64,
            reference,
        };
        if self.recent.len() < 64 {
            self.recent.push(ticket.clone());
        } else {
            let i = self.rng.below(64);
            self.recent[i] = ticket.clone();
        }
        ticket
    }
}

/// Values that fill a scenario's `{placeholders}`.
struct Slots {
    customer: &'static str,
    user: &'static str,
    device: &'static str,
    app: &'static str,
    site: &'static str,
    code: String,
    n: usize,
    amount: usize,
    time: String,
}

impl Slots {
    fn draw(rng: &mut SplitMix64, chinese: bool) -> Self {
        let (users, sites): (&[&str], &[&str]) = if chinese {
            (
                &[
                    "张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄强",
                ],
                &[
                    "上海办公室",
                    "北京总部",
                    "深圳研发中心",
                    "杭州分公司",
                    "成都仓库",
                ],
            )
        } else {
            (
                &[
                    "Maria Lopez",
                    "James Chen",
                    "Priya Nair",
                    "Tom Becker",
                    "Aisha Khan",
                    "Lucas Martin",
                ],
                &[
                    "Berlin office",
                    "London HQ",
                    "Austin warehouse",
                    "Toronto branch",
                    "Madrid site",
                ],
            )
        };
        Self {
            customer: rng.pick(&[
                "Northwind Traders",
                "Contoso Ltd",
                "Fabrikam",
                "Tailspin Toys",
                "Litware Inc",
                "Adventure Works",
                "华星科技",
                "蓝海物流",
            ]),
            user: rng.pick(users),
            device: rng.pick(&[
                "ThinkPad T14",
                "Dell Latitude 7440",
                "MacBook Pro 14",
                "HP EliteBook 840",
                "Surface Pro 9",
            ]),
            app: rng.pick(&[
                "Outlook",
                "SAP GUI",
                "Salesforce",
                "Teams",
                "Jira",
                "VPN client",
                "Excel",
            ]),
            site: rng.pick(sites),
            code: format!("0x{:04X}", 0x1000 + rng.below(0xEFFF)),
            n: 2 + rng.below(40),
            amount: 50 + rng.below(9950),
            time: format!("{:02}:{:02}", 7 + rng.below(12), rng.below(60)),
        }
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{customer}", self.customer)
            .replace("{user}", self.user)
            .replace("{device}", self.device)
            .replace("{app}", self.app)
            .replace("{site}", self.site)
            .replace("{code}", &self.code)
            .replace("{n}", &self.n.to_string())
            .replace("{amount}", &self.amount.to_string())
            .replace("{time}", &self.time)
    }
}

struct Scenario {
    category: &'static str,
    en: Text,
    zh: Text,
}

/// One language's wording of a scenario: a variant (subject, opening sentence, the
/// reference summary an agent wrote), a random subset of the details in order, and an ask.
/// That spread gives bodies of realistic, varied length.
struct Text {
    variants: &'static [(&'static str, &'static str, &'static str)],
    details: &'static [&'static str],
    asks: &'static [&'static str],
}

impl Text {
    fn render(
        &self,
        rng: &mut SplitMix64,
        slots: &Slots,
        chinese: bool,
    ) -> (String, String, String) {
        let (subject, opening, reference) = self.variants[rng.below(self.variants.len())];
        let mut parts = vec![slots.fill(opening)];
        for detail in self.details {
            if rng.chance(550) {
                parts.push(slots.fill(detail));
            }
        }
        parts.push(slots.fill(rng.pick(self.asks)));
        let greeting = if chinese {
            rng.pick(&["", "您好，\n", "你好，IT支持：\n", "麻烦帮忙看一下："])
        } else {
            rng.pick(&["", "Hi team,\n\n", "Hello IT,\n\n", "Good morning,\n"])
        };
        let signature = if chinese {
            rng.pick(&["", "\n谢谢！", "辛苦了。"])
        } else {
            rng.pick(&[
                "",
                "\n\nThanks!",
                "\n\nRegards,\n{user}",
                " Thank you in advance.",
            ])
        };
        let separator = if chinese { "" } else { " " };
        let body = format!(
            "{greeting}{}{}",
            parts.join(separator),
            slots.fill(signature)
        );
        (slots.fill(subject), body, slots.fill(reference))
    }
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        category: "hardware",
        en: Text {
            variants: &[
                (
                    "Laptop will not boot",
                    "My {device} does not start since this morning.",
                    "{device} does not boot; user needs a repair or a loaner.",
                ),
                (
                    "{device} stuck on black screen",
                    "{user}'s {device} shows a black screen after the power button is pressed.",
                    "{user}'s {device} stays on a black screen at power-on; repair requested.",
                ),
            ],
            details: &[
                "The power LED blinks {n} times and then turns off.",
                "I tried a different charger and held the power button for 30 seconds, no change.",
                "It last worked yesterday after installing the firmware update.",
                "There is a client presentation at {time} and all files are on the local disk.",
            ],
            asks: &[
                "Can someone replace or repair it today?",
                "Please advise whether I should bring it to the service desk.",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "笔记本无法开机",
                    "我的{device}从今天早上开始无法开机。",
                    "{device}无法开机，用户需要维修或备用机。",
                ),
                (
                    "{device}开机黑屏",
                    "{user}的{device}按下电源键后一直黑屏。",
                    "{user}的{device}开机黑屏，请求维修。",
                ),
            ],
            details: &[
                "电源指示灯闪烁{n}次后熄灭。",
                "已经换了充电器并长按电源键30秒，没有变化。",
                "昨天安装固件更新后还能正常使用。",
                "下午{time}有客户演示，文件都在本地硬盘上。",
            ],
            asks: &["请尽快安排维修或借用电脑。", "请问是否需要送到服务台处理？"],
        },
    },
    Scenario {
        category: "network",
        en: Text {
            variants: &[
                (
                    "VPN keeps disconnecting",
                    "The VPN client disconnects every {n} minutes when working from home.",
                    "VPN drops every {n} minutes for a home worker; connection fix requested.",
                ),
                (
                    "No network at {site}",
                    "Nobody at the {site} can reach the internal network since {time}.",
                    "Network outage at {site} since {time}; urgent check requested.",
                ),
            ],
            details: &[
                "The error message says 'tunnel closed by peer' with code {code}.",
                "Wired connections behave the same as Wi-Fi.",
                "Restarting the router did not help.",
                "About {n} colleagues are affected and cannot reach the file shares.",
            ],
            asks: &[
                "Please check whether there is an outage.",
                "Could the network team look into it urgently?",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "VPN频繁断线",
                    "在家办公时VPN每{n}分钟就断开一次。",
                    "居家办公VPN每{n}分钟断线，请求排查。",
                ),
                (
                    "{site}网络中断",
                    "{site}从{time}开始无法访问内网。",
                    "{site}自{time}起网络中断，请求紧急排查。",
                ),
            ],
            details: &[
                "报错信息为“隧道被对端关闭”，错误码{code}。",
                "有线和无线网络情况一样。",
                "重启路由器后仍然无法解决。",
                "大约{n}位同事受影响，无法访问共享文件。",
            ],
            asks: &["请确认是否有网络故障。", "请网络组尽快排查。"],
        },
    },
    Scenario {
        category: "accounts",
        en: Text {
            variants: &[
                (
                    "Account locked out",
                    "{user} is locked out of their account after too many attempts.",
                    "{user} locked out after failed logins; unlock requested.",
                ),
                (
                    "Cannot reset password for {app}",
                    "The password reset link for {app} says it has expired.",
                    "{app} password reset link expired; new link requested.",
                ),
            ],
            details: &[
                "The authenticator app shows no push notification.",
                "They changed phones last week and did not move the MFA token.",
                "Payroll has to be approved in {app} before {time} today.",
                "The self-service portal returns error {code}.",
            ],
            asks: &[
                "Please unlock the account and re-enrol MFA.",
                "Can you send a new reset link?",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "账号被锁定",
                    "{user}多次输错密码后账号被锁定。",
                    "{user}多次输错密码导致账号锁定，请求解锁。",
                ),
                (
                    "{app}无法重置密码",
                    "{app}的密码重置链接显示已过期。",
                    "{app}密码重置链接过期，请求重新发送。",
                ),
            ],
            details: &[
                "身份验证器应用没有收到推送通知。",
                "上周更换了手机，没有迁移认证令牌。",
                "今天{time}前必须在{app}中审批工资单。",
                "自助服务门户返回错误{code}。",
            ],
            asks: &["请解锁账号并重新绑定多因素认证。", "能否重新发送重置链接？"],
        },
    },
    Scenario {
        category: "software",
        en: Text {
            variants: &[
                (
                    "{app} crashes on start",
                    "{app} crashes immediately after the splash screen.",
                    "{app} crashes at start-up; fix or rollback requested.",
                ),
                (
                    "{app} freezes when exporting",
                    "Exporting a report from {app} freezes the whole application.",
                    "{app} freezes on report export; help requested.",
                ),
            ],
            details: &[
                "The crash started after last night's automatic update.",
                "Event log shows a faulting module with exception code {code}.",
                "Reinstalling from the software center did not fix it.",
                "The report has about {n} thousand rows.",
            ],
            asks: &[
                "Is there a known fix or a rollback?",
                "Please help, the quarter-end deadline is close.",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "{app}启动即崩溃",
                    "{app}在启动画面后立即崩溃。",
                    "{app}启动即崩溃，请求修复或回滚。",
                ),
                (
                    "{app}导出时卡死",
                    "从{app}导出报表时整个程序卡死。",
                    "{app}导出报表时卡死，请求协助。",
                ),
            ],
            details: &[
                "昨晚自动更新后开始出现崩溃。",
                "事件日志显示异常代码{code}。",
                "从软件中心重新安装也没有解决。",
                "报表大约有{n}千行数据。",
            ],
            asks: &[
                "请问有没有已知的修复方法或回滚方案？",
                "季度结账临近，请尽快协助。",
            ],
        },
    },
    Scenario {
        category: "billing",
        en: Text {
            variants: &[
                (
                    "Invoice charged twice",
                    "{customer} was charged {amount} USD twice for the same invoice.",
                    "{customer} charged twice ({amount} USD); refund of the duplicate requested.",
                ),
                (
                    "Wrong amount on invoice",
                    "The March invoice for {customer} shows {amount} USD instead of the agreed price.",
                    "{customer}'s March invoice wrong ({amount} USD); corrected invoice requested.",
                ),
            ],
            details: &[
                "Both charges appear on the card statement with the same reference.",
                "The contract lists {n} licences, the invoice bills more.",
                "Finance needs a corrected invoice before month end.",
            ],
            asks: &[
                "Please refund the duplicate charge.",
                "Can billing issue a corrected invoice?",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "发票重复扣款",
                    "{customer}同一张发票被扣款两次，每次{amount}元。",
                    "{customer}同一发票重复扣款{amount}元，请求退款。",
                ),
                (
                    "发票金额错误",
                    "{customer}三月份发票金额为{amount}元，与合同价格不符。",
                    "{customer}三月发票金额{amount}元有误，请求更正。",
                ),
            ],
            details: &[
                "两笔扣款的参考号相同。",
                "合同约定{n}个许可证，发票多计了数量。",
                "财务需要在月底前拿到更正后的发票。",
            ],
            asks: &["请退还重复扣款。", "请账务部门重新开具发票。"],
        },
    },
    Scenario {
        category: "security",
        en: Text {
            variants: &[
                (
                    "Possible phishing",
                    "{user} received an email asking to confirm their {app} password via a link.",
                    "Suspected phishing email targeting {user}'s {app} password; review requested.",
                ),
                (
                    "Unknown login alert",
                    "I got an alert about a login to my account from an unknown country at {time}.",
                    "Alert of a login from an unknown country at {time}; account check requested.",
                ),
            ],
            details: &[
                "The sender address looks like our domain but with one letter changed.",
                "I clicked the link but did not enter anything.",
                "The attachment is a zip file named invoice_{n}.zip.",
            ],
            asks: &[
                "Please check whether my account is compromised.",
                "Should I delete it or forward it to security?",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "疑似钓鱼邮件",
                    "{user}收到一封要求通过链接确认{app}密码的邮件。",
                    "{user}收到索要{app}密码的疑似钓鱼邮件，请求安全检查。",
                ),
                (
                    "陌生登录提醒",
                    "我在{time}收到账号从陌生国家登录的提醒。",
                    "{time}账号出现陌生国家登录提醒，请求检查账号安全。",
                ),
            ],
            details: &[
                "发件人地址与公司域名只差一个字母。",
                "我点了链接，但没有输入任何信息。",
                "附件是名为invoice_{n}.zip的压缩包。",
            ],
            asks: &[
                "请检查我的账号是否被盗。",
                "这封邮件应该删除还是转给安全团队？",
            ],
        },
    },
    Scenario {
        category: "email",
        en: Text {
            variants: &[
                (
                    "Mailbox full",
                    "Outlook says my mailbox is full and I cannot send messages.",
                    "Mailbox full, cannot send; quota increase requested.",
                ),
                (
                    "Emails not syncing on phone",
                    "Emails stopped syncing to my phone since {time} yesterday.",
                    "Phone mail sync stopped since {time} yesterday; fix requested.",
                ),
            ],
            details: &[
                "The mailbox is at {n} GB of the 50 GB quota.",
                "The shared mailbox for {customer} disappeared from the folder list.",
                "Webmail works normally.",
            ],
            asks: &[
                "Can the quota be increased?",
                "Please restore access to the shared mailbox.",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "邮箱已满",
                    "Outlook提示邮箱已满，无法发送邮件。",
                    "邮箱已满无法发信，请求扩容。",
                ),
                (
                    "手机邮件不同步",
                    "从昨天{time}开始手机上的邮件不再同步。",
                    "手机邮件自昨天{time}起不同步，请求修复。",
                ),
            ],
            details: &[
                "邮箱已使用{n}GB，配额为50GB。",
                "{customer}的共享邮箱从文件夹列表中消失了。",
                "网页版邮箱正常。",
            ],
            asks: &["能否扩大邮箱容量？", "请恢复共享邮箱的访问权限。"],
        },
    },
    Scenario {
        category: "printing",
        en: Text {
            variants: &[
                (
                    "Printer offline at {site}",
                    "The printer on the second floor of the {site} shows as offline.",
                    "Second-floor printer at {site} offline; technician requested.",
                ),
                (
                    "Print jobs stuck in queue",
                    "Print jobs stay in the queue and never print.",
                    "Print jobs stuck in the queue; queue reset requested.",
                ),
            ],
            details: &[
                "The display shows error {code}.",
                "About {n} jobs are waiting in the queue.",
                "Other printers on the same floor work.",
            ],
            asks: &[
                "Please send a technician.",
                "Could you clear the queue remotely?",
            ],
        },
        zh: Text {
            variants: &[
                (
                    "{site}打印机离线",
                    "{site}二楼的打印机显示离线。",
                    "{site}二楼打印机离线，请求派人处理。",
                ),
                (
                    "打印任务卡在队列中",
                    "打印任务一直停留在队列中，无法打印。",
                    "打印任务卡在队列，请求清空队列。",
                ),
            ],
            details: &[
                "屏幕显示错误{code}。",
                "队列中大约有{n}个任务在等待。",
                "同楼层的其他打印机正常。",
            ],
            asks: &["请派技术人员处理。", "能否远程清空打印队列？"],
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, StringArray};

    fn column(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .map(|c| c.iter().map(|v| v.map(str::to_string)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn same_seed_same_rows_other_seed_other_rows() -> Result<(), PipelineError> {
        let options = SampleOptions {
            rows: 500,
            seed: 7,
            clean: false,
        };
        let a = Generator::new(&options).batch(500)?;
        let b = Generator::new(&options).batch(500)?;
        assert_eq!(a, b);
        let c = Generator::new(&SampleOptions { seed: 8, ..options }).batch(500)?;
        assert_ne!(column(&a, "body"), column(&c, "body"));
        Ok(())
    }

    #[test]
    fn mixes_languages_categories_and_dirty_rows() -> Result<(), PipelineError> {
        let options = SampleOptions {
            rows: 5000,
            seed: 1,
            clean: false,
        };
        let batch = Generator::new(&options).batch(5000)?;
        let langs = column(&batch, "language");
        let zh = langs.iter().filter(|l| l.as_deref() == Some("zh")).count();
        assert!((1500..2500).contains(&zh), "{zh} Chinese tickets of 5000");
        let categories: std::collections::HashSet<_> =
            column(&batch, "category").into_iter().collect();
        assert_eq!(categories.len(), SCENARIOS.len());
        let ids = column(&batch, "ticket_id");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert!(distinct.len() < ids.len(), "expected some re-sent tickets");
        let blank = column(&batch, "body")
            .iter()
            .filter(|b| b.as_deref().is_none_or(|b| b.trim().is_empty()))
            .count();
        assert!(blank > 0);
        assert!(
            column(&batch, "body")
                .iter()
                .flatten()
                .all(|b| !b.contains('{')),
            "unfilled placeholder"
        );

        let clean = Generator::new(&SampleOptions {
            clean: true,
            ..options
        })
        .batch(5000)?;
        let ids = column(&clean, "ticket_id");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert_eq!(clean.column(2).null_count(), 0);
        Ok(())
    }
}
