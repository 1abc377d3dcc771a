package org.ehrbridge.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import jakarta.persistence.EntityManagerFactory;
import java.util.List;
import java.util.Map;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.UnknownCodeSystemWarningValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.orm.jpa.HibernateJpaAutoConfiguration;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * A plain HAPI FHIR JPA server (R4, H2) for ehrbridge's write-back tests and
 * sandbox: the server defaults a hospital would meet, nothing made kinder.
 * Conditional creates racing each other answer 409 (no retry interceptor),
 * searchset Bundles carry no total unless _total=accurate, and with
 * ehrbridge.validation=true every request body is checked by the instance
 * validator against the R4 core, invalid resources answering 422.
 */
// HAPI brings Elasticsearch and Thymeleaf jars; their auto-configurations would
// sniff for a cluster that is not there and look for templates that are not used.
@SpringBootApplication(
        exclude = {QuartzAutoConfiguration.class, HibernateJpaAutoConfiguration.class},
        excludeName = {
            "org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration",
            "org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration",
            "org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration"
        })
@Import({
    JpaR4Config.class,
    ThreadPoolFactoryConfig.class,
    SubscriptionChannelConfig.class,
    JpaBatch2Config.class,
    Batch2JobsConfig.class
})
public class HapiServer {

    public static void main(String[] args) {
        SpringApplication.run(HapiServer.class, args);
    }

    @Bean
    public JpaStorageSettings storageSettings() {
        JpaStorageSettings settings = new JpaStorageSettings();
        settings.setAllowMultipleDelete(true);
        settings.setExpungeEnabled(true);
        return settings;
    }

    @Bean
    public PartitionSettings partitionSettings() {
        return new PartitionSettings();
    }

    @Bean
    public SubscriptionSettings subscriptionSettings() {
        return new SubscriptionSettings();
    }

    @Bean
    public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
        return new StaleSearchDeletingSvcImpl();
    }

    @Bean
    public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
        DatabaseBackedPagingProvider paging = new DatabaseBackedPagingProvider();
        paging.setDefaultPageSize(20);
        paging.setMaximumPageSize(200);
        return paging;
    }

    @Bean
    public IResourceSupportedSvc resourceSupportedSvc(DaoRegistry daoRegistry) {
        return new DaoRegistryResourceSupportedSvc(daoRegistry);
    }

    @Bean(name = "myResourceCountsCache")
    public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> systemDao) {
        return ResourceCountCacheUtil.newResourceCountCache(systemDao);
    }

    @Primary
    @Bean
    public LocalContainerEntityManagerFactoryBean entityManagerFactory(
            ConfigurableListableBeanFactory beanFactory,
            FhirContext fhirContext,
            JpaStorageSettings storageSettings,
            javax.sql.DataSource dataSource) {
        LocalContainerEntityManagerFactoryBean factory =
                HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
        factory.setPersistenceUnitName("HAPI_PU");
        factory.setDataSource(dataSource);
        factory.setJpaPropertyMap(Map.of(
                "hibernate.dialect", HapiFhirH2Dialect.class.getName(),
                "hibernate.hbm2ddl.auto", "update",
                "hibernate.jdbc.batch_size", "20",
                "hibernate.cache.use_query_cache", "false",
                "hibernate.cache.use_second_level_cache", "false",
                "hibernate.search.enabled", "false",
                "hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner"));
        return factory;
    }

    @Bean
    @Primary
    public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
        return new JpaTransactionManager(entityManagerFactory);
    }

    /** The plain base, /fhir: validates requests only with ehrbridge.validation=true. */
    @Bean
    @Primary
    public RestfulServer restfulServer(
            FhirServers servers, @Value("${ehrbridge.validation:false}") boolean validation) {
        return servers.create(validation);
    }

    @Bean
    public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer restfulServer) {
        return servlet(restfulServer, "/fhir/*");
    }

    /**
     * /fhir-validating: the same database behind a server that always runs the
     * instance validator, so one start-up (~48 CPU-seconds) serves the tests of
     * both behaviours. Not a bean: HAPI's components expect one RestfulServer.
     */
    @Bean
    public ServletRegistrationBean<RestfulServer> validatingServlet(FhirServers servers) {
        return servlet(servers.create(true), "/fhir-validating/*");
    }

    private static ServletRegistrationBean<RestfulServer> servlet(RestfulServer server, String path) {
        ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, path);
        registration.setName(path);
        registration.setLoadOnStartup(1);
        return registration;
    }

    @Bean
    public FhirServers fhirServers(
            IFhirSystemDao<?, ?> systemDao,
            ResourceProviderFactory resourceProviders,
            IJpaSystemProvider systemProvider,
            JpaStorageSettings storageSettings,
            ISearchParamRegistry searchParamRegistry,
            IValidationSupport validationSupport,
            DatabaseBackedPagingProvider paging) {
        return validation -> {
            RestfulServer server = new RestfulServer(systemDao.getContext());
            server.registerProviders(resourceProviders.createProviders());
            server.registerProvider(systemProvider);
            server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
                    server, systemDao, storageSettings, searchParamRegistry, validationSupport));
            server.setPagingProvider(paging);
            if (validation) {
                server.registerInterceptor(requestValidator(systemDao.getContext()));
            }
            return server;
        };
    }

    /** Makes a RestfulServer over the shared DAOs, with or without request validation. */
    @FunctionalInterface
    public interface FhirServers {
        RestfulServer create(boolean validation);
    }

    /**
     * The instance validator against the bundled R4 core, as a hospital's
     * validating server runs it: errors reject the request (422), while a
     * code system the server does not hold (LOINC, a site's local codes) is
     * a warning, since no public server bundles every terminology.
     */
    private static RequestValidatingInterceptor requestValidator(FhirContext context) {
        UnknownCodeSystemWarningValidationSupport unknownSystems =
                new UnknownCodeSystemWarningValidationSupport(context);
        unknownSystems.setNonExistentCodeSystemSeverity(IValidationSupport.IssueSeverity.WARNING);
        ValidationSupportChain chain = new ValidationSupportChain(
                new DefaultProfileValidationSupport(context),
                new CommonCodeSystemsTerminologyService(context),
                new InMemoryTerminologyServerValidationSupport(context),
                new SnapshotGeneratingValidationSupport(context),
                unknownSystems);
        RequestValidatingInterceptor interceptor = new RequestValidatingInterceptor();
        interceptor.setFailOnSeverity(ResultSeverityEnum.ERROR);
        interceptor.setValidatorModules(List.of(new FhirInstanceValidator(chain)));
        interceptor.setAddResponseHeaderOnSeverity(null);
        return interceptor;
    }

}
